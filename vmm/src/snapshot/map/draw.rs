//! The map: guest physical memory as a grid of cells, each cell a group of pages coloured by
//! the classes of its pages (a mix weighted by page count), with a legend, per-class totals and
//! the RAM regions (the 32-bit MMIO gap shows as cells that are not RAM).

use svgdoc::{Anchor, Svg};

use super::classes::{ClassRecordError, PageClass, PageClassRuns};
use crate::snapshot::format::PAGE_BYTES;
use crate::snapshot::state::MemoryIndex;

/// Most cells drawn: bigger guests get more pages per cell.
pub const MAX_CELLS: u64 = 4096;
/// Cells per grid row.
const COLUMNS: u64 = 64;
/// Cell edge in pixels.
const CELL_PX: f64 = 12.0;
const LEFT_PX: f64 = 96.0;
const TOP_PX: f64 = 30.0;
const LINE_PX: f64 = 16.0;
/// Colour of address space that is not RAM (the MMIO gap).
const NOT_RAM_COLOUR: &str = "#404040";
/// Slot of "not RAM" in a cell's counts, after the page classes.
const NOT_RAM: usize = PageClass::ALL.len();

/// What the map shows, for `inspect --json` and tests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapSummary {
    /// Whether the snapshot recorded every page's class (else only kept vs left out).
    pub classes_recorded: bool,
    /// Pages per cell.
    pub pages_per_cell: u64,
    /// Cells in the grid.
    pub cells: u64,
    /// Pages of each class (classes with none left out), legend order.
    pub totals: Vec<(String, u64)>,
}

/// One cell's pages by class (the last slot: not RAM).
type CellCounts = [u64; NOT_RAM + 1];

/// Draws the map of `index` with a title and note lines above it. A recorded class record that
/// does not cover guest RAM is an error.
pub fn render_map(
    index: &MemoryIndex,
    title: &str,
    notes: &[String],
) -> Result<(String, MapSummary), ClassRecordError> {
    let recorded = PageClassRuns::recorded(index)?;
    let derived;
    let runs = match recorded {
        Some(runs) => runs,
        None => {
            derived = PageClassRuns::from_chunks(index);
            &derived
        }
    };
    let base = index.regions.first().map_or(0, |r| r.0);
    let end = index.regions.last().map_or(0, |r| r.0 + r.1);
    let space_pages = (end - base) / PAGE_BYTES;
    let pages_per_cell = space_pages.div_ceil(MAX_CELLS).max(1).next_power_of_two();
    let cells = space_pages.div_ceil(pages_per_cell);
    let counts = cell_counts(index, runs, base, pages_per_cell, cells);

    let rows = cells.div_ceil(COLUMNS);
    let mut lines: Vec<String> = notes.to_vec();
    if recorded.is_none() {
        lines.push("page classes not recorded (snapshot format 2 or older): only kept and left-out pages are known".into());
    }
    lines.push(format!("RAM: {}", describe_regions(&index.regions)));
    lines.push(format!(
        "one cell = {} page{} ({}); a cell's colour mixes its pages' classes; hover a cell for its breakdown",
        pages_per_cell,
        if pages_per_cell == 1 { "" } else { "s" },
        size_text(pages_per_cell * PAGE_BYTES)
    ));
    let grid_top = TOP_PX + LINE_PX * (lines.len() as f64 + 0.5);
    let grid_h = rows as f64 * CELL_PX;
    let totals: Vec<(PageClass, u64)> = runs.totals().into_iter().filter(|t| t.1 > 0).collect();
    let gap_pages: u64 = counts.iter().map(|c| c[NOT_RAM]).sum();
    let legend_rows = totals.len() + usize::from(gap_pages > 0) + 1;
    let width = LEFT_PX + COLUMNS as f64 * CELL_PX + 40.0;
    let height = grid_top + grid_h + 30.0 + legend_rows as f64 * LINE_PX * 1.25 + 10.0;
    let mut svg = Svg::new(width.max(720.0), height);
    svg.text(10.0, 20.0, 15.0, Anchor::Start, true, title);
    for (i, line) in lines.iter().enumerate() {
        svg.text(
            10.0,
            TOP_PX + LINE_PX * (i as f64 + 0.7),
            12.0,
            Anchor::Start,
            false,
            line,
        );
    }

    draw_cells(&mut svg, &counts, base, pages_per_cell, grid_top);
    for row in (0..rows).step_by(4) {
        let gpa = base + row * COLUMNS * pages_per_cell * PAGE_BYTES;
        let y = grid_top + row as f64 * CELL_PX + CELL_PX - 2.0;
        svg.text(
            LEFT_PX - 6.0,
            y,
            10.0,
            Anchor::End,
            false,
            &address_text(gpa),
        );
    }
    svg.frame(
        LEFT_PX,
        grid_top,
        COLUMNS as f64 * CELL_PX,
        grid_h,
        "#000000",
    );

    let ram_pages: u64 = runs.total_pages();
    let mut y = grid_top + grid_h + 28.0;
    svg.text(
        10.0,
        y,
        12.0,
        Anchor::Start,
        true,
        &format!(
            "guest RAM: {ram_pages} pages ({})",
            size_text(ram_pages * PAGE_BYTES)
        ),
    );
    let mut legend = |svg: &mut Svg, colour: &str, text: String| {
        y += LINE_PX * 1.25;
        svg.rect(10.0, y - 11.0, 14.0, 14.0, colour, None);
        svg.frame(10.0, y - 11.0, 14.0, 14.0, "#000000");
        svg.text(32.0, y, 12.0, Anchor::Start, false, &text);
    };
    for &(class, pages) in &totals {
        legend(
            &mut svg,
            class.colour(),
            total_text(class.name(), pages, ram_pages),
        );
    }
    if gap_pages > 0 {
        legend(
            &mut svg,
            NOT_RAM_COLOUR,
            format!("not RAM (MMIO gap): {}", size_text(gap_pages * PAGE_BYTES)),
        );
    }
    let summary = MapSummary {
        classes_recorded: recorded.is_some(),
        pages_per_cell,
        cells,
        totals: totals
            .iter()
            .map(|&(c, n)| (c.name().to_string(), n))
            .collect(),
    };
    Ok((svg.finish(), summary))
}

/// A legend line: `NAME: P pages (X MiB, Y%)`.
pub fn total_text(name: &str, pages: u64, ram_pages: u64) -> String {
    format!(
        "{name}: {pages} pages ({}, {:.1}%)",
        size_text(pages * PAGE_BYTES),
        pages as f64 * 100.0 / ram_pages.max(1) as f64
    )
}

/// Every cell's pages by class, walking the regions (and the gaps between them) in order.
fn cell_counts(
    index: &MemoryIndex,
    runs: &PageClassRuns,
    base: u64,
    pages_per_cell: u64,
    cells: u64,
) -> Vec<CellCounts> {
    let mut counts = vec![[0u64; NOT_RAM + 1]; cells as usize];
    let mut add = |slot: usize, mut at: u64, mut pages: u64| {
        while pages > 0 {
            let cell = at / pages_per_cell;
            let take = pages.min((cell + 1) * pages_per_cell - at);
            if let Some(c) = counts.get_mut(cell as usize) {
                c[slot] += take;
            }
            at += take;
            pages -= take;
        }
    };
    let mut runs = runs.runs().iter().copied();
    let mut current: Option<(PageClass, u64)> = None;
    let mut prev_end = base;
    for &(start, len) in &index.regions {
        if start > prev_end {
            add(
                NOT_RAM,
                (prev_end - base) / PAGE_BYTES,
                (start - prev_end) / PAGE_BYTES,
            );
        }
        let mut at = (start - base) / PAGE_BYTES;
        let mut left = len / PAGE_BYTES;
        while left > 0 {
            let Some((class, pages)) = current.take().or_else(|| runs.next()) else {
                break;
            };
            let take = pages.min(left);
            let slot = PageClass::ALL
                .iter()
                .position(|c| *c == class)
                .unwrap_or(NOT_RAM);
            add(slot, at, take);
            at += take;
            left -= take;
            if pages > take {
                current = Some((class, pages - take));
            }
        }
        prev_end = start + len;
    }
    counts
}

/// Draws the cells; neighbours in a row with the same counts become one rectangle.
fn draw_cells(svg: &mut Svg, counts: &[CellCounts], base: u64, pages_per_cell: u64, top: f64) {
    let mut i = 0;
    while i < counts.len() {
        let row = i as u64 / COLUMNS;
        let mut j = i + 1;
        while j < counts.len() && j as u64 / COLUMNS == row && counts[j] == counts[i] {
            j += 1;
        }
        let col = i as u64 % COLUMNS;
        let from = base + i as u64 * pages_per_cell * PAGE_BYTES;
        let to = base + j as u64 * pages_per_cell * PAGE_BYTES;
        let tip = format!("{:#x}-{:#x}: {}", from, to, breakdown(&counts[i]));
        svg.rect(
            LEFT_PX + col as f64 * CELL_PX,
            top + row as f64 * CELL_PX,
            (j - i) as f64 * CELL_PX,
            CELL_PX,
            &mix(&counts[i]),
            Some(&tip),
        );
        i = j;
    }
}

/// `kept 75%, zero 25%`.
fn breakdown(c: &CellCounts) -> String {
    let total: u64 = c.iter().sum::<u64>().max(1);
    let name = |slot: usize| PageClass::ALL.get(slot).map_or("not RAM", |c| c.name());
    let mut parts: Vec<(usize, u64)> = c.iter().copied().enumerate().filter(|p| p.1 > 0).collect();
    parts.sort_by_key(|p| std::cmp::Reverse(p.1));
    parts
        .iter()
        .map(|&(slot, n)| format!("{} {:.0}%", name(slot), n as f64 * 100.0 / total as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The page-weighted mix of the cell's class colours.
fn mix(c: &CellCounts) -> String {
    let total: u64 = c.iter().sum();
    if total == 0 {
        return NOT_RAM_COLOUR.into();
    }
    let mut rgb = [0f64; 3];
    for (slot, &n) in c.iter().enumerate() {
        let colour = PageClass::ALL
            .get(slot)
            .map_or(NOT_RAM_COLOUR, |c| c.colour());
        for (k, v) in rgb.iter_mut().enumerate() {
            let channel = u8::from_str_radix(&colour[1 + 2 * k..3 + 2 * k], 16).unwrap_or(0);
            *v += f64::from(channel) * n as f64 / total as f64;
        }
    }
    format!(
        "#{:02x}{:02x}{:02x}",
        rgb[0].round() as u8,
        rgb[1].round() as u8,
        rgb[2].round() as u8
    )
}

/// `0x0-0x20000000 (512 MiB)`, regions and the gaps between them.
fn describe_regions(regions: &[(u64, u64)]) -> String {
    let mut parts = Vec::new();
    let mut prev: Option<u64> = None;
    for &(start, len) in regions {
        if let Some(end) = prev.filter(|e| *e < start) {
            parts.push(format!(
                "gap (MMIO) {end:#x}-{start:#x} ({})",
                size_text(start - end)
            ));
        }
        parts.push(format!(
            "{start:#x}-{:#x} ({})",
            start + len,
            size_text(len)
        ));
        prev = Some(start + len);
    }
    parts.join("; ")
}

/// A row label: `N MiB` on MiB boundaries, else hex.
fn address_text(gpa: u64) -> String {
    if gpa.is_multiple_of(1 << 20) {
        format!("{} MiB", gpa >> 20)
    } else {
        format!("{gpa:#x}")
    }
}

/// Bytes as `X.Y MiB` (or KiB below a MiB).
fn size_text(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn runs(text: &str) -> PageClassRuns {
        PageClassRuns::try_from(text.to_string()).unwrap()
    }

    #[test]
    fn the_map_is_well_formed_and_its_totals_match_the_record() {
        // Two regions (2 MiB, a 2 MiB gap, 1 MiB) = 768 pages of RAM, 1280 pages of space.
        let index = MemoryIndex {
            regions: vec![(0, 2 * MIB), (4 * MIB, MIB)],
            classes: Some(runs("n1 k2 z1 n6 r1 b100 h50 n342 k1 n264")),
            ..MemoryIndex::default()
        };
        let (text, summary) = render_map(&index, "snapshot <x> & y", &["a note".into()]).unwrap();
        let doc = svgdoc::check_well_formed(&text).unwrap();
        assert_eq!(doc.root, "svg");
        assert!(summary.classes_recorded);
        assert_eq!(summary.pages_per_cell, 1);
        assert_eq!(summary.cells, 1280);
        assert_eq!(doc.texts[0], "snapshot <x> & y");
        for (class, pages) in [
            (PageClass::Kept, 3),
            (PageClass::Zero, 1),
            (PageClass::Reported, 1),
            (PageClass::Inflated, 100),
            (PageClass::Hinted, 50),
            (PageClass::NeverTouched, 613),
        ] {
            let line = total_text(class.name(), pages, 768);
            assert!(
                doc.texts.contains(&line),
                "{line} missing from {:?}",
                doc.texts
            );
            assert!(summary.totals.contains(&(class.name().to_string(), pages)));
        }
        assert!(doc.texts.iter().any(|t| t == "not RAM (MMIO gap): 2.0 MiB"));
        assert!(doc
            .texts
            .iter()
            .any(|t| t.contains("gap (MMIO) 0x200000-0x400000")));
        // Tooltips: the first cell is never touched, the gap is not RAM.
        assert!(doc
            .texts
            .iter()
            .any(|t| t == "0x0-0x1000: never touched 100%"));
        assert!(doc
            .texts
            .iter()
            .any(|t| t == "0x200000-0x240000: not RAM 100%"));
    }

    #[test]
    fn big_guests_get_at_most_max_cells_and_mixed_cells() {
        // 4 GiB of RAM around a 1 GiB gap: 3 GiB, gap, 1 GiB.
        let ram = 4 * 1024 * MIB / PAGE_BYTES;
        let index = MemoryIndex {
            regions: vec![(0, 3072 * MIB), (4096 * MIB, 1024 * MIB)],
            classes: Some(runs(&format!("k{} z{}", ram / 2 + 3, ram / 2 - 3))),
            ..MemoryIndex::default()
        };
        let (text, summary) = render_map(&index, "big", &[]).unwrap();
        assert!(summary.cells <= MAX_CELLS, "{summary:?}");
        let doc = svgdoc::check_well_formed(&text).unwrap();
        assert!(
            doc.count("rect") < 200,
            "uniform rows merge: {}",
            doc.count("rect")
        );
        assert!(
            doc.texts.iter().any(|t| t.contains("zero 99%, kept 1%")),
            "{:?}",
            doc.texts
        );
        assert_eq!(mix(&[1, 0, 0, 0, 0, 1, 0, 0, 0]), "#da8535");
    }

    #[test]
    fn old_snapshots_draw_kept_and_left_out_and_bad_records_are_refused() {
        let index = MemoryIndex {
            regions: vec![(0, MIB)],
            chunks: vec![crate::snapshot::state::MemoryChunk {
                gpa: 4096,
                len_bytes: 4096,
                file_offset: 4096,
                sum: crate::snapshot::checksum::ChunkSum::PENDING,
            }],
            ..MemoryIndex::default()
        };
        let (text, summary) = render_map(&index, "old", &[]).unwrap();
        assert!(!summary.classes_recorded);
        let doc = svgdoc::check_well_formed(&text).unwrap();
        assert!(doc
            .texts
            .iter()
            .any(|t| t.starts_with("page classes not recorded")));
        assert!(doc
            .texts
            .contains(&total_text(PageClass::Skipped.name(), 255, 256)));
        let bad = MemoryIndex {
            classes: Some(runs("k3")),
            ..index
        };
        assert!(render_map(&bad, "bad", &[]).is_err());
    }
}

//! Bar charts of benchmark results as SVG (`bench chart RESULTS.json --out FILE.svg`).
//!
//! The input is generic: a [`Chart`] is a title, a unit and groups of labelled values (one
//! group per variant, one bar per figure), so any suite can draw its figures with [`write_svg`].
//! A results file may carry its charts (`"charts": [...]`, see [`ChartSpec`]); for the existing
//! `snapshot.json`, `trim.json` and `suite.json` the charts are derived from their figures.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use svgdoc::{Anchor, Svg};

/// One bar chart: groups of bars sharing a unit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Chart {
    /// Shown above the chart.
    pub title: String,
    /// The values' unit (`MiB`, `ms`, ...), on the axis.
    pub unit: String,
    /// Groups along the x axis (e.g. one per variant), each with its bars.
    pub groups: Vec<Group>,
}

/// One group of bars.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// Below the group.
    pub label: String,
    /// `(series, value)`: bars of the same series share a colour across groups.
    pub bars: Vec<(String, f64)>,
}

impl Chart {
    /// A chart of single bars: one group per `(label, value)`.
    pub fn simple<L: Into<String>>(
        title: &str,
        unit: &str,
        bars: impl IntoIterator<Item = (L, f64)>,
    ) -> Chart {
        Chart {
            title: title.into(),
            unit: unit.into(),
            groups: bars
                .into_iter()
                .map(|(label, value)| Group {
                    label: label.into(),
                    bars: vec![(unit.into(), value)],
                })
                .collect(),
        }
    }
}

/// How a results file lists its charts (`"charts"`), if it does.
#[derive(Deserialize)]
pub struct ChartSpec {
    /// The charts.
    pub charts: Vec<Chart>,
}

const PANEL_W: f64 = 760.0;
const PANEL_H: f64 = 280.0;
const PLOT_LEFT: f64 = 80.0;
const PLOT_TOP: f64 = 56.0;
const PLOT_H: f64 = 170.0;
const PALETTE: [&str; 6] = [
    "#2e86c1", "#e67e22", "#27ae60", "#8e44ad", "#c0392b", "#7f8c8d",
];

/// Draws `charts` stacked in one SVG under `title`.
pub fn render(title: &str, charts: &[Chart]) -> String {
    let mut svg = Svg::new(PANEL_W, 34.0 + PANEL_H * charts.len() as f64);
    svg.text(10.0, 22.0, 16.0, Anchor::Start, true, title);
    for (i, chart) in charts.iter().enumerate() {
        draw_panel(&mut svg, chart, 34.0 + PANEL_H * i as f64);
    }
    svg.finish()
}

/// Writes [`render`] to `path`.
pub fn write_svg(path: &Path, title: &str, charts: &[Chart]) -> anyhow::Result<()> {
    std::fs::write(path, render(title, charts))
        .with_context(|| format!("cannot write the chart {}", path.display()))
}

/// The series of a chart, in first-seen order.
fn series(chart: &Chart) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for (name, _) in chart.groups.iter().flat_map(|g| &g.bars) {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    names
}

/// The axis maximum, the first of 1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 × 10^k at or above
/// `max`, and how many gridline steps divide it into round numbers.
fn nice_axis(max: f64) -> (f64, u32) {
    if max.is_nan() || max <= 0.0 || max.is_infinite() {
        return (1.0, 5);
    }
    let magnitude = 10f64.powf(max.log10().floor());
    const STEPS: [(f64, u32); 11] = [
        (1.0, 5),
        (1.2, 4),
        (1.5, 3),
        (2.0, 4),
        (2.5, 5),
        (3.0, 3),
        (4.0, 4),
        (5.0, 5),
        (6.0, 3),
        (8.0, 4),
        (10.0, 5),
    ];
    STEPS
        .into_iter()
        .map(|(m, ticks)| (m * magnitude, ticks))
        .find(|(v, _)| *v >= max * (1.0 - 1e-9))
        .unwrap_or((10.0 * magnitude, 5))
}

/// A value as a short label.
pub fn value_text(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn draw_panel(svg: &mut Svg, chart: &Chart, top: f64) {
    let names = series(chart);
    svg.text(10.0, top + 22.0, 14.0, Anchor::Start, true, &chart.title);
    // Legend (only when there is more than one series).
    if names.len() > 1 {
        let mut x = PLOT_LEFT;
        for (i, name) in names.iter().enumerate() {
            svg.rect(x, top + 32.0, 10.0, 10.0, PALETTE[i % PALETTE.len()], None);
            svg.text(x + 14.0, top + 41.0, 11.0, Anchor::Start, false, name);
            x += 24.0 + 6.5 * name.chars().count() as f64;
        }
    }
    let max = chart
        .groups
        .iter()
        .flat_map(|g| g.bars.iter().map(|b| b.1))
        .fold(0.0, f64::max);
    let (axis_max, ticks) = nice_axis(max);
    let plot_top = top + PLOT_TOP;
    let plot_w = PANEL_W - PLOT_LEFT - 20.0;
    let y_of = |v: f64| plot_top + PLOT_H - (v.max(0.0) / axis_max) * PLOT_H;
    for step in 0..=ticks {
        let v = axis_max * f64::from(step) / f64::from(ticks);
        let y = y_of(v);
        svg.line(PLOT_LEFT, y, PLOT_LEFT + plot_w, y, "#dddddd");
        svg.text(
            PLOT_LEFT - 6.0,
            y + 4.0,
            10.0,
            Anchor::End,
            false,
            &value_text(v),
        );
    }
    svg.text(
        14.0,
        plot_top - 6.0,
        11.0,
        Anchor::Start,
        false,
        &chart.unit,
    );
    let groups = chart.groups.len().max(1) as f64;
    let group_w = plot_w / groups;
    for (gi, group) in chart.groups.iter().enumerate() {
        let gx = PLOT_LEFT + gi as f64 * group_w;
        let bar_w = (group_w * 0.8 / group.bars.len().max(1) as f64).min(60.0);
        let start = gx + (group_w - bar_w * group.bars.len() as f64) / 2.0;
        for (bi, (name, value)) in group.bars.iter().enumerate() {
            let colour = names.iter().position(|n| n == name).unwrap_or(0);
            let x = start + bi as f64 * bar_w;
            let y = y_of(*value);
            let tip = format!(
                "{} / {name}: {} {}",
                group.label,
                value_text(*value),
                chart.unit
            );
            svg.rect(
                x + 1.0,
                y,
                bar_w - 2.0,
                plot_top + PLOT_H - y,
                PALETTE[colour % PALETTE.len()],
                Some(&tip),
            );
            svg.text(
                x + bar_w / 2.0,
                y - 3.0,
                10.0,
                Anchor::Middle,
                false,
                &value_text(*value),
            );
        }
        svg.text(
            gx + group_w / 2.0,
            plot_top + PLOT_H + 16.0,
            11.0,
            Anchor::Middle,
            false,
            &group.label,
        );
    }
    svg.line(
        PLOT_LEFT,
        plot_top + PLOT_H,
        PLOT_LEFT + plot_w,
        plot_top + PLOT_H,
        "#000000",
    );
}

/// Arguments of `bench chart`.
#[derive(clap::Args, Debug)]
pub struct ChartArgs {
    /// A results file (bench-results/NAME.json).
    pub results: PathBuf,
    /// The SVG to write (default: the results file with `.svg`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `bench chart`: draws a results file's charts.
pub fn run(args: ChartArgs) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(&args.results)
        .with_context(|| format!("cannot read {}", args.results.display()))?;
    let results: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", args.results.display()))?;
    let charts = charts_of(&results)
        .with_context(|| format!("cannot find figures to draw in {}", args.results.display()))?;
    let out = args
        .out
        .unwrap_or_else(|| args.results.with_extension("svg"));
    let name = args
        .results
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    write_svg(&out, &format!("bench-results/{name}"), &charts)?;
    println!("{} charts written to {}", charts.len(), out.display());
    Ok(0)
}

/// The charts of a results file: its own `"charts"`, or derived from a known layout.
pub fn charts_of(results: &Value) -> anyhow::Result<Vec<Chart>> {
    if results.get("charts").is_some() {
        let spec: ChartSpec = serde_json::from_value(results.clone()).context("bad \"charts\"")?;
        return Ok(spec.charts);
    }
    if let Some(summary) = results
        .get("summary")
        .filter(|s| s.get("variants").is_some())
    {
        return Ok(crate::suite::charts::suite_charts(summary));
    }
    if let Some(summary) = results.get("summary").and_then(Value::as_object) {
        return Ok(snapshot_charts(summary));
    }
    if let Some(steps) = results.get("steps").and_then(Value::as_array) {
        return Ok(trim_charts(steps, results.get("median")));
    }
    anyhow::bail!("no \"charts\", \"summary\" (snapshot) or \"steps\" (trim)")
}

fn num(v: Option<&Value>) -> f64 {
    v.and_then(Value::as_f64).unwrap_or(0.0)
}

/// `snapshot.json`: `summary` maps `MODE/verify=X` to figures.
fn snapshot_charts(summary: &serde_json::Map<String, Value>) -> Vec<Chart> {
    const MIB: f64 = 1048576.0;
    let group = |case: &str, fig: &[(&str, &str, f64)]| Group {
        label: case.to_string(),
        bars: fig
            .iter()
            .map(|&(name, key, scale)| (name.to_string(), num(summary[case].get(key)) * scale))
            .collect(),
    };
    let modes: Vec<&String> = summary
        .keys()
        .filter(|k| k.ends_with("verify=no"))
        .collect();
    let mode = |k: &str| k.split('/').next().unwrap_or(k).to_string();
    vec![
        Chart {
            title: "Snapshot size (guest 512 MiB)".into(),
            unit: "MiB".into(),
            groups: modes
                .iter()
                .map(|k| Group {
                    label: mode(k),
                    ..group(
                        k,
                        &[
                            ("memory file", "memory_file_bytes", 1.0 / MIB),
                            ("on disk", "snapshot_disk_kib", 1.0 / 1024.0),
                        ],
                    )
                })
                .collect(),
        },
        Chart {
            title: "Snapshot time (rig, emulated)".into(),
            unit: "ms".into(),
            groups: modes
                .iter()
                .map(|k| Group {
                    label: mode(k),
                    ..group(
                        k,
                        &[
                            ("pause → written (wall)", "snapshot_wall_ms", 1.0),
                            ("write memory", "write_ms", 1.0),
                        ],
                    )
                })
                .collect(),
        },
        Chart {
            title: "Restore time (rig, emulated)".into(),
            unit: "ms".into(),
            groups: summary
                .keys()
                .map(|k| {
                    group(
                        k,
                        &[
                            ("→ vCPUs running", "restore_to_vcpus_running_ms", 1.0),
                            ("→ first console", "restore_to_first_console_ms", 1.0),
                        ],
                    )
                })
                .collect(),
        },
    ]
}

/// `trim.json`: per-step medians and the memory before and after.
fn trim_charts(steps: &[Value], median: Option<&Value>) -> Vec<Chart> {
    let step_bars = |key: &str| -> Vec<(String, f64)> {
        steps
            .iter()
            .map(|s| {
                let kind = s
                    .get("kind")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string();
                (kind, num(s.get(key).and_then(|v| v.get("median"))))
            })
            .collect()
    };
    let m = |key: &str| {
        num(median
            .and_then(|m| m.get(key))
            .and_then(|v| v.get("median")))
    };
    vec![
        Chart::simple(
            "Trim steps: time (median, rig)",
            "ms",
            step_bars("duration_ms"),
        ),
        Chart::simple(
            "Trim steps: guest memory freed (median)",
            "MiB",
            step_bars("freed_mib"),
        ),
        Chart {
            title: "Memory before and after a trim (median)".into(),
            unit: "MiB".into(),
            groups: vec![
                Group {
                    label: "guest used".into(),
                    bars: vec![
                        ("before".into(), m("guest_used_before_mib")),
                        ("after".into(), m("guest_used_after_mib")),
                    ],
                },
                Group {
                    label: "host RSS of the VMM".into(),
                    bars: vec![
                        ("before".into(), m("host_rss_before_mib")),
                        ("after".into(), m("host_rss_after_mib")),
                    ],
                },
            ],
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_with_one_bar_per_value() {
        let charts = vec![
            Chart::simple("sizes <MiB>", "MiB", [("raw", 512.0), ("compact", 136.9)]),
            Chart {
                title: "times".into(),
                unit: "ms".into(),
                groups: vec![
                    Group {
                        label: "ours".into(),
                        bars: vec![("save".into(), 3.5), ("restore".into(), 0.25)],
                    },
                    Group {
                        label: "qemu".into(),
                        bars: vec![("save".into(), 12.0), ("restore".into(), 40.0)],
                    },
                ],
            },
        ];
        let doc = svgdoc::check_well_formed(&render("t & u", &charts)).unwrap();
        let tips: Vec<&String> = doc.texts.iter().filter(|t| t.contains(" / ")).collect();
        assert_eq!(tips.len(), 6, "{tips:?}");
        for expected in [
            "raw / MiB: 512 MiB",
            "compact / MiB: 137 MiB",
            "ours / save: 3.5 ms",
            "qemu / restore: 40 ms",
            "ours / restore: 0.25 ms",
        ] {
            assert!(
                doc.texts.iter().any(|t| t == expected),
                "{expected}: {:?}",
                doc.texts
            );
        }
        assert!(doc.texts.contains(&"sizes <MiB>".to_string()));
        assert_eq!(nice_axis(512.0), (600.0, 3));
        assert_eq!(nice_axis(136.9), (150.0, 3));
        assert_eq!(nice_axis(0.0), (1.0, 5));
    }

    #[test]
    fn charts_come_from_the_results_files() {
        let own = serde_json::json!({"charts": [{"title": "x", "unit": "s", "groups": [{"label": "a", "bars": [["s", 1.0]]}]}]});
        assert_eq!(charts_of(&own).unwrap()[0].groups[0].bars[0].1, 1.0);
        let snapshot = serde_json::json!({"summary": {
            "compact/verify=no": {"memory_file_bytes": 1048576.0 * 137.0, "snapshot_disk_kib": 1024.0 * 137.0, "snapshot_wall_ms": 3840.0, "write_ms": 3403.0, "restore_to_vcpus_running_ms": 211.6, "restore_to_first_console_ms": 264.3},
            "compact/verify=yes": {"restore_to_vcpus_running_ms": 2327.9, "restore_to_first_console_ms": 2371.1},
            "raw/verify=no": {"memory_file_bytes": 1048576.0 * 512.0, "snapshot_disk_kib": 1024.0 * 512.0}
        }});
        let charts = charts_of(&snapshot).unwrap();
        assert_eq!(charts.len(), 3);
        assert_eq!(charts[0].groups[0].label, "compact");
        assert_eq!(
            charts[0].groups[1].bars[0],
            ("memory file".to_string(), 512.0)
        );
        assert_eq!(charts[2].groups.len(), 3);
        let trim = serde_json::json!({"steps": [{"kind": "hooks", "duration_ms": {"median": 1448.0}, "freed_mib": {"median": 65.0}}],
            "median": {"guest_used_before_mib": {"median": 154.0}, "guest_used_after_mib": {"median": 88.5}}});
        let charts = charts_of(&trim).unwrap();
        assert_eq!(charts[0].groups[0].bars[0].1, 1448.0);
        assert_eq!(charts[2].groups[0].bars[1], ("after".to_string(), 88.5));
        assert!(charts_of(&serde_json::json!({"x": 1})).is_err());
    }
}

//! This process's page tables as `/proc/self/pagemap` shows them: which pages of a mapping were
//! mapped or swapped out, that is touched since the mapping was made (read without privileges:
//! only the flags are needed, not the page frame numbers).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The file.
pub const PAGEMAP_PATH: &str = "/proc/self/pagemap";
/// Entry bit 63: the page is mapped.
pub const PRESENT: u64 = 1 << 63;
/// Entry bit 62: the page is swapped out.
pub const SWAPPED: u64 = 1 << 62;
/// Host page size the file counts in, bytes.
const PAGE_BYTES: u64 = 4096;
/// Entries read per system call (64 KiB of them).
const BATCH_PAGES: u64 = 8192;

/// Calls `each(i, entry)` for page `i` of the `pages` pages mapped from host address `host`
/// (page aligned), in order.
pub fn for_each_entry(
    host: u64,
    pages: u64,
    mut each: impl FnMut(u64, u64),
) -> std::io::Result<()> {
    let pagemap = File::open(Path::new(PAGEMAP_PATH))?;
    let mut entries = vec![0u8; (BATCH_PAGES.min(pages) * 8) as usize];
    let mut page = 0;
    while page < pages {
        let batch = (pages - page).min(BATCH_PAGES);
        let bytes = &mut entries[..batch as usize * 8];
        pagemap.read_exact_at(bytes, (host / PAGE_BYTES + page) * 8)?;
        for (i, entry) in bytes.chunks_exact(8).enumerate() {
            each(
                page + i as u64,
                u64::from_ne_bytes(entry.try_into().expect("8 bytes")),
            );
        }
        page += batch;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_pages_are_present_others_not() {
        let pages = 3 * BATCH_PAGES / 2;
        let mut v = vec![0u8; (pages * PAGE_BYTES) as usize + PAGE_BYTES as usize];
        let start = v.as_ptr().align_offset(PAGE_BYTES as usize);
        let host = v.as_ptr() as u64 + start as u64;
        // A fresh large allocation is untouched anonymous memory: write two pages of it, one in
        // each batch.
        for page in [3, BATCH_PAGES + 7] {
            v[start + (page * PAGE_BYTES) as usize] = 1;
        }
        let mut present = Vec::new();
        for_each_entry(host, pages, |i, e| {
            if e & PRESENT != 0 {
                present.push(i)
            }
        })
        .unwrap();
        assert!(
            present.contains(&3) && present.contains(&(BATCH_PAGES + 7)),
            "{present:?}"
        );
        assert!(present.len() < 16, "{} pages present", present.len());
    }
}

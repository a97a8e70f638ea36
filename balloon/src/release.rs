//! Giving guest RAM back to the host.
//!
//! The device decides *which* guest pages the host may drop (inflated and reported pages); the
//! VMM decides *how*, because only it knows the backing of guest RAM: `MADV_DONTNEED` on private
//! anonymous memory, hole punching on a memfd, or remapping anonymous memory over a privately
//! mapped snapshot file (where `MADV_DONTNEED` would bring back the file's old contents, see
//! README.md "Known pitfalls").

/// Releases ranges of guest RAM on the host. After a successful call the range must read as
/// zeros to the guest, and its host memory may be reclaimed.
///
/// The device only calls it with page-aligned ranges that lie inside guest RAM (both the
/// page-state map's layout and the guest memory given at activation), after marking the pages
/// in the page-state map. Calls come from the device's worker thread.
pub trait RamReleaser: Send + Sync {
    /// Releases `len_bytes` bytes of guest RAM starting at guest physical address `gpa`.
    fn release(&self, gpa: u64, len_bytes: u64) -> std::io::Result<()>;
}

/// Tells the page-state map which guest pages were written since it last looked (the VMM
/// implements it with KVM's dirty log).
///
/// The device calls it with the map locked, right before it marks pages Inflated, Reported or
/// Hinted: writes the guest made before handing the pages over (a kernel booted with
/// `init_on_alloc=1` zeroes every block it allocates for a hint) are applied first, so they do
/// not turn the freshly marked pages Live at the next sync. Writes after the mark still do.
pub trait WriteTracker: Send + Sync {
    /// Marks every page written since the previous call Live in `map`; returns how many pages
    /// changed state.
    fn sync_into(
        &self,
        map: &mut crate::PageStateMap,
    ) -> Result<u64, Box<dyn std::error::Error + Send + Sync>>;
}

//! The balloon's five queues (inflate, deflate, stats, free page hinting, free page reporting)
//! fed hostile descriptor tables, rings and buffers through virtio-queue's mock queue over guest
//! memory with a hole. Invariants (checked after every round by the balloon crate's harness):
//! only whole pages inside guest RAM are released; the page-state map covers exactly guest RAM
//! and its per-state counts agree with every page's state.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    balloon::queues::guest_input::fuzz_queues(data);
});

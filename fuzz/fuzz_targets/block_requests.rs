//! virtio-blk request chains (block/src/request.rs `parse`) from hostile descriptor tables over
//! guest memory with a hole. Invariants: the status byte and every data buffer of an accepted
//! request lie in guest RAM; data lengths add up; reads and writes stay within the disk.
#![no_main]

use block::request::{check_sectors, parse, Limits, RequestKind};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{guest_memory, in_ram, pop_chain, queue_with_chain, Input};

fuzz_target!(|data: &[u8]| {
    let mem = guest_memory();
    let mut input = Input(data);
    let limits = Limits {
        capacity_sectors: u64::from(input.u32()),
        discard: input.u8() & 1 != 0,
        write_zeroes: input.u8() & 1 != 0,
    };
    let mut queue = queue_with_chain(&mem, &mut input);
    let Some(chain) = pop_chain(&mut queue, &mem) else {
        return;
    };
    let Ok(parsed) = parse(chain, &mem, &limits) else {
        return;
    };
    assert!(
        in_ram(parsed.status_gpa, 1),
        "status at {:#x}",
        parsed.status_gpa
    );
    let Ok(request) = parsed.request else {
        return;
    };
    let mut total = 0u64;
    for seg in &request.data {
        assert!(in_ram(seg.gpa, seg.len_bytes), "segment {seg:?}");
        total += seg.len_bytes;
    }
    assert_eq!(total, request.data_len_bytes);
    if matches!(request.kind, RequestKind::In | RequestKind::Out) {
        assert_eq!(total % 512, 0);
        check_sectors(&limits, request.sector, total / 512).expect("inside the disk");
    }
});

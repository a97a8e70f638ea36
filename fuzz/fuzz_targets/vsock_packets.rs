//! vsock tx packets (vsock/src/packet.rs `read_tx`) from a hostile descriptor chain over guest
//! memory with a hole. Invariants: a packet that parses has exactly the payload its header
//! announces, within the limit; headers round-trip through their byte encoding; the payload is
//! the guest's bytes (checked against a direct read when the chain is one buffer in RAM).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_fuzz::{guest_memory, in_ram, pop_chain, queue_with_chain, Input};
use vsock::packet::{read_tx, Header, HDR_BYTES, MAX_PAYLOAD_BYTES};

fuzz_target!(|data: &[u8]| {
    let mem = guest_memory();
    let mut input = Input(data);
    let mut queue = queue_with_chain(&mem, &mut input);
    let Some(chain) = pop_chain(&mut queue, &mem) else {
        return;
    };
    let descs: Vec<_> = chain.clone().collect();
    if let Ok((header, payload)) = read_tx(&mem, chain) {
        assert_eq!(payload.len(), header.len as usize);
        assert!(payload.len() <= MAX_PAYLOAD_BYTES);
        assert_eq!(Header::from_bytes(&header.to_bytes()), header);
        if let [only] = descs.as_slice() {
            let gpa = only.addr().0;
            assert!(in_ram(gpa, u64::from(only.len())));
            let mut direct = vec![0u8; payload.len()];
            mem.read_slice(&mut direct, GuestAddress(gpa + HDR_BYTES as u64))
                .expect("payload in RAM");
            assert_eq!(direct, payload);
        }
    }
});

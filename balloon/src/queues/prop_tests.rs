//! Property-style test: random descriptor tables, available rings and buffer contents on every
//! queue, from a seeded PRNG, through [`super::guest_input::Harness`].

use super::guest_input::Harness;
use crate::test_utils::Rng;

#[test]
fn random_guest_input_never_escapes_guest_ram() {
    for seed in [1u64, 0xdead_beef, 42, 0x1234_5678_9abc_def0] {
        let mut rng = Rng(seed);
        let mut harness = Harness::new();
        for round in 0..400 {
            harness.round(&mut rng);
            if let Err(broken) = harness.check() {
                panic!("seed {seed} round {round}: {broken}");
            }
        }
        // The device did real work, not only rejections.
        let c = harness.counters();
        assert!(c.invalid_buffers > 0, "seed {seed}: {c:?}");
        assert!(
            c.pages_inflated + c.pages_reported + c.pages_hinted > 0,
            "seed {seed}: {c:?}"
        );
    }
}

#[test]
fn fuzzer_bytes_drive_the_same_rounds() {
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    super::guest_input::fuzz_queues(&data);
    super::guest_input::fuzz_queues(&[]);
}

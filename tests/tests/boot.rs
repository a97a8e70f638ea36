//! Boot scenarios under real KVM: one `#[test]` per scenario of `tests::scenarios`.
//!
//! The first test to run starts the whole suite (one rig boot for all scenarios, see
//! `tests::harness`); the others wait for it and assert on their own scenario's result. A
//! scenario that did not run fails. Live consoles are on stderr; the full log goes to
//! `target/e2e/last-run.log`.

use tests::harness::{assert_scenario, suite};

macro_rules! scenario_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                assert_scenario(stringify!($name));
            }
        )*

        /// Every scenario the runner knows has a test here, and every one reported a result.
        #[test]
        fn every_scenario_has_a_test_and_a_result() {
            let tested = [$(stringify!($name)),*];
            let known = tests::scenarios::names();
            for n in &known {
                assert!(tested.contains(n), "scenario {n} has no #[test] in boot.rs");
            }
            for n in &tested {
                assert!(known.contains(n), "#[test] {n} names no scenario");
            }
            let suite = suite().unwrap_or_else(|e| panic!("the e2e suite could not run: {e}"));
            let missing: Vec<_> = known.iter().filter(|n| !suite.results.contains_key(**n)).collect();
            assert!(missing.is_empty(), "scenarios without a result: {missing:?}");
        }
    };
}

scenario_tests!(
    bad_missing_kernel,
    bad_not_bzimage,
    bad_initrd_too_big,
    bad_mem_too_small,
    bad_zero_vcpus,
    bad_config_unknown_field,
    bad_kvm_not_permitted,
    bad_api_sock_in_use,
    bad_api_malformed_json,
    boot_1vcpu,
    boot_2vcpu,
    poweroff_exits_fast,
    sigterm_stops_cleanly,
    pause_resume,
    balloon_statistics,
    balloon_inflate_deflate,
    balloon_deflate_on_oom,
    balloon_oom_without_deflate,
    balloon_reporting_returns_memory,
    balloon_hinting,
    snapshot_round_trip_1vcpu,
    snapshot_round_trip_2vcpu_two_clones,
    snapshot_bad_input,
    crash_kill_while_writing,
    soak_short,
    hostile_guest_flood,
    snapshot_fresh_1gib_is_compact,
    snapshot_reported_memory_is_left_out,
    snapshot_with_vsock,
    snapshot_lazy_uffd,
    snapshot_serve_load,
    snapshot_working_set,
    layers_chain,
    block_bad_disk_path,
    block_disks,
    vsock_ping_concurrency_vanishing_client,
    vsock_bulk_both_ways,
    trim_pipeline,
    trim_default_keeps_hot,
    trim_fast_keeps_hot,
    trim_aggressive_drops_hot,
    pipeline_trim_then_snapshot,
);

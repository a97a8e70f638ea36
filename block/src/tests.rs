//! Device-level tests: requests through a mock queue, as a guest driver would submit them.

use virtio_device::{VirtioDevice, VIRTIO_F_VERSION_1};
use vm_memory::{Bytes, GuestAddress};

use crate::device::*;
use crate::persist::PersistError;
use crate::request::*;
use crate::test_utils::*;
use crate::Block;

const IMAGE_BYTES: usize = 64 * 1024;

fn read_config(block: &Block, offset: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0xaa; len];
    block.read_config(offset, &mut data);
    data
}

#[test]
fn features_and_config_space() {
    let env = Env::new(IMAGE_BYTES + 100, false);
    let features = env.block.avail_features();
    assert_eq!(env.block.device_type(), 2);
    assert_ne!(features & VIRTIO_F_VERSION_1, 0);
    assert_ne!(features & VIRTIO_BLK_F_FLUSH, 0);
    assert_eq!(features & VIRTIO_BLK_F_RO, 0);
    // The host's /tmp punches holes.
    assert_ne!(features & VIRTIO_BLK_F_DISCARD, 0);
    // Capacity: whole sectors only (the 100-byte tail is not visible).
    assert_eq!(read_config(&env.block, 0, 8), 128u64.to_le_bytes());
    assert_eq!(read_config(&env.block, 12, 4), 254u32.to_le_bytes());
    assert_eq!(read_config(&env.block, 56, 1), [1]);
    assert_eq!(read_config(&env.block, 58, 4), [0, 0, 0, 0]);
    assert_eq!(read_config(&env.block, u64::MAX, 2), [0, 0]);

    let ro = Env::new(IMAGE_BYTES, true);
    let features = ro.block.avail_features();
    assert_ne!(features & VIRTIO_BLK_F_RO, 0);
    assert_eq!(
        features & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES),
        0
    );
    assert_eq!(read_config(&ro.block, 36, 4), [0; 4]);
}

#[test]
fn reads_writes_flush_and_get_id() {
    let env = Env::new(IMAGE_BYTES, false);
    let mut dq = DriverQueue::new(&env.mem);
    let mut queue = dq.queue();
    let acked = env.block.avail_features();

    // Read sectors 2..4 into two data buffers.
    env.header(VIRTIO_BLK_T_IN, 2);
    dq.add_chain(&[
        (HDR_GPA, 16, 0),
        (DATA_GPA, 512, WRITE),
        (DATA_GPA + 4096, 512, WRITE),
        (STATUS_GPA, 1, WRITE),
    ]);
    queue = env.process(queue, acked);
    assert_eq!(env.status(), VIRTIO_BLK_S_OK);
    assert_eq!(dq.used(0), (0, 1025));
    let mut got = vec![0u8; 512];
    env.mem
        .read_slice(&mut got, GuestAddress(DATA_GPA + 4096))
        .unwrap();
    assert_eq!(got, pattern(IMAGE_BYTES)[1536..2048]);

    // Write one sector at 10, then flush.
    env.mem
        .write_slice(&[0x5a; 512], GuestAddress(DATA_GPA))
        .unwrap();
    env.header(VIRTIO_BLK_T_OUT, 10);
    dq.add_chain(&[(HDR_GPA, 16, 0), (DATA_GPA, 512, 0), (STATUS_GPA, 1, WRITE)]);
    queue = env.process(queue, acked);
    assert_eq!(env.status(), VIRTIO_BLK_S_OK);
    env.header(VIRTIO_BLK_T_FLUSH, 0);
    dq.add_chain(&[(HDR_GPA, 16, 0), (STATUS_GPA, 1, WRITE)]);
    queue = env.process(queue, acked);
    assert_eq!(env.status(), VIRTIO_BLK_S_OK);
    let file = std::fs::read(env.file.path()).unwrap();
    assert_eq!(&file[5120..5632], &[0x5a; 512]);
    assert_eq!(file[5632], pattern(IMAGE_BYTES)[5632]);

    // GET_ID: the drive id, NUL-padded to 20 bytes.
    env.header(VIRTIO_BLK_T_GET_ID, 0);
    dq.add_chain(&[
        (HDR_GPA, 16, 0),
        (DATA_GPA, 20, WRITE),
        (STATUS_GPA, 1, WRITE),
    ]);
    queue = env.process(queue, acked);
    assert_eq!(env.status(), VIRTIO_BLK_S_OK);
    let mut id = [0u8; 20];
    env.mem.read_slice(&mut id, GuestAddress(DATA_GPA)).unwrap();
    assert_eq!(&id[..6], b"disk0\0");

    // Header, data and status in one readable and one writable descriptor (no framing).
    env.header(VIRTIO_BLK_T_IN, 0);
    dq.add_chain(&[(HDR_GPA, 16, 0), (STATUS_GPA - 512, 513, WRITE)]);
    env.process(queue, acked);
    assert_eq!(env.status(), VIRTIO_BLK_S_OK);
    let mut got = vec![0u8; 512];
    env.mem
        .read_slice(&mut got, GuestAddress(STATUS_GPA - 512))
        .unwrap();
    assert_eq!(got, pattern(512));
    let c = env.counters();
    assert_eq!(
        (c.reads, c.writes, c.flushes, c.read_bytes),
        (2, 1, 1, 1536)
    );
}

#[test]
fn discard_and_write_zeroes_punch_holes() {
    let env = Env::new(IMAGE_BYTES, false);
    let mut dq = DriverQueue::new(&env.mem);
    let acked = env.block.avail_features();
    let range = |sector: u64, n: u32, flags: u32| {
        let mut r = [0u8; 16];
        r[0..8].copy_from_slice(&sector.to_le_bytes());
        r[8..12].copy_from_slice(&n.to_le_bytes());
        r[12..16].copy_from_slice(&flags.to_le_bytes());
        r
    };
    env.mem
        .write_slice(&range(8, 8, 0), GuestAddress(DATA_GPA))
        .unwrap();
    env.header(VIRTIO_BLK_T_DISCARD, 0);
    dq.add_chain(&[(HDR_GPA, 16, 0), (DATA_GPA, 16, 0), (STATUS_GPA, 1, WRITE)]);
    let queue = env.process(dq.queue(), acked);
    assert_eq!(env.status(), VIRTIO_BLK_S_OK);
    env.mem
        .write_slice(&range(20, 4, 1), GuestAddress(DATA_GPA))
        .unwrap();
    env.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    dq.add_chain(&[(HDR_GPA, 16, 0), (DATA_GPA, 16, 0), (STATUS_GPA, 1, WRITE)]);
    let queue = env.process(queue, acked);
    assert_eq!(env.status(), VIRTIO_BLK_S_OK);
    let file = std::fs::read(env.file.path()).unwrap();
    assert!(file[4096..8192].iter().all(|&b| b == 0));
    assert!(file[10240..12288].iter().all(|&b| b == 0));
    assert_eq!(file[8192], pattern(IMAGE_BYTES)[8192]);
    // Flags other than UNMAP, and ranges past the end.
    env.mem
        .write_slice(&range(0, 1, 2), GuestAddress(DATA_GPA))
        .unwrap();
    dq.add_chain(&[(HDR_GPA, 16, 0), (DATA_GPA, 16, 0), (STATUS_GPA, 1, WRITE)]);
    let queue = env.process(queue, acked);
    assert_eq!(env.status(), VIRTIO_BLK_S_UNSUPP);
    env.mem
        .write_slice(&range(u64::MAX, 2, 0), GuestAddress(DATA_GPA))
        .unwrap();
    env.header(VIRTIO_BLK_T_DISCARD, 0);
    dq.add_chain(&[(HDR_GPA, 16, 0), (DATA_GPA, 16, 0), (STATUS_GPA, 1, WRITE)]);
    env.process(queue, acked);
    assert_eq!(env.status(), VIRTIO_BLK_S_IOERR);
}

/// One malformed request: the status the guest gets and the used length.
fn bad_request(env: &Env, kind: u32, sector: u64, descs: &[(u64, u32, u16)]) -> (u8, u32) {
    let mut dq = DriverQueue::new(&env.mem);
    env.header(kind, sector);
    dq.add_chain(descs);
    env.process(dq.queue(), env.block.avail_features());
    assert_eq!(dq.used_idx(), 1, "every chain is completed");
    (env.status(), dq.used(0).1)
}

#[test]
fn malformed_requests_get_errors_not_crashes() {
    let env = Env::new(IMAGE_BYTES, false);
    let sectors = (IMAGE_BYTES / 512) as u64;
    let hdr = (HDR_GPA, 16, 0);
    let status = (STATUS_GPA, 1, WRITE);
    let ioerr = (VIRTIO_BLK_S_IOERR, 1);
    // Past the end, straddling the end, overflowing.
    assert_eq!(
        bad_request(&env, 0, sectors, &[hdr, (DATA_GPA, 512, WRITE), status]),
        ioerr
    );
    assert_eq!(
        bad_request(&env, 1, sectors - 1, &[hdr, (DATA_GPA, 1024, 0), status]),
        ioerr
    );
    assert_eq!(
        bad_request(&env, 0, u64::MAX, &[hdr, (DATA_GPA, 512, WRITE), status]),
        ioerr
    );
    // Not whole sectors.
    assert_eq!(
        bad_request(&env, 0, 0, &[hdr, (DATA_GPA, 100, WRITE), status]),
        ioerr
    );
    // Data outside guest memory, or wrapping the address space.
    assert_eq!(
        bad_request(&env, 0, 0, &[hdr, (MEM_BYTES - 256, 512, WRITE), status]),
        ioerr
    );
    assert_eq!(
        bad_request(&env, 0, 0, &[hdr, (u64::MAX - 10, 512, WRITE), status]),
        ioerr
    );
    // Header too short, header outside memory.
    assert_eq!(bad_request(&env, 0, 0, &[(HDR_GPA, 8, 0), status]), ioerr);
    assert_eq!(
        bad_request(&env, 0, 0, &[(MEM_BYTES, 16, 0), status]),
        ioerr
    );
    // Readable data in a read, writable data in a write, readable after writable.
    assert_eq!(
        bad_request(&env, 0, 0, &[hdr, (DATA_GPA, 512, 0), status]),
        ioerr
    );
    assert_eq!(
        bad_request(&env, 1, 0, &[hdr, (DATA_GPA, 512, WRITE), status]),
        ioerr
    );
    assert_eq!(
        bad_request(&env, 0, 0, &[hdr, status, (DATA_GPA, 512, 0)]).0,
        VIRTIO_BLK_S_IOERR
    );
    // Short GET_ID buffer; unknown type; discard not negotiated.
    assert_eq!(
        bad_request(&env, 8, 0, &[hdr, (DATA_GPA, 10, WRITE), status]),
        ioerr
    );
    assert_eq!(
        bad_request(&env, 99, 0, &[hdr, status]),
        (VIRTIO_BLK_S_UNSUPP, 1)
    );
    // No status byte at all: completed with nothing written; status outside memory too.
    assert_eq!(
        bad_request(&env, 0, 0, &[hdr, (DATA_GPA, 512, 0)]),
        (0xff, 0)
    );
    assert_eq!(
        bad_request(&env, 0, 0, &[hdr, (MEM_BYTES + 4096, 1, WRITE)]),
        (0xff, 0)
    );
    assert_eq!(
        bad_request(&env, 0, 0, &[hdr, (u64::MAX, 2, WRITE)]),
        (0xff, 0)
    );
    let c = env.counters();
    assert_eq!(
        (c.invalid_requests, c.invalid_chains, c.reads, c.writes),
        (13, 3, 0, 0)
    );
    // The disk is untouched.
    assert_eq!(
        std::fs::read(env.file.path()).unwrap(),
        pattern(IMAGE_BYTES)
    );
}

#[test]
fn read_only_disks_refuse_writes() {
    let env = Env::new(IMAGE_BYTES, true);
    let hdr = (HDR_GPA, 16, 0);
    let status = (STATUS_GPA, 1, WRITE);
    assert_eq!(
        bad_request(
            &env,
            VIRTIO_BLK_T_OUT,
            0,
            &[hdr, (DATA_GPA, 512, 0), status]
        ),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    // Discard is not offered on a read-only disk.
    assert_eq!(
        bad_request(
            &env,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[hdr, (DATA_GPA, 16, 0), status]
        )
        .0,
        VIRTIO_BLK_S_UNSUPP
    );
    assert_eq!(
        std::fs::read(env.file.path()).unwrap(),
        pattern(IMAGE_BYTES)
    );
    // Reads work.
    assert_eq!(
        bad_request(
            &env,
            VIRTIO_BLK_T_IN,
            0,
            &[hdr, (DATA_GPA, 512, WRITE), status]
        ),
        (VIRTIO_BLK_S_OK, 513)
    );
}

#[test]
fn a_backing_file_that_shrank_gives_io_errors() {
    let env = Env::new(IMAGE_BYTES, false);
    // The guest still sees the old capacity; the file lost its second half.
    std::fs::OpenOptions::new()
        .write(true)
        .open(env.file.path())
        .unwrap()
        .set_len(IMAGE_BYTES as u64 / 2)
        .unwrap();
    let last = (IMAGE_BYTES / 512 - 1) as u64;
    let (status, _) = bad_request(
        &env,
        VIRTIO_BLK_T_IN,
        last,
        &[
            (HDR_GPA, 16, 0),
            (DATA_GPA, 512, WRITE),
            (STATUS_GPA, 1, WRITE),
        ],
    );
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    assert_eq!(env.counters().io_errors, 1);
}

#[test]
fn worker_serves_notifications_and_stops_on_reset() {
    use std::sync::Arc;
    let mut env = Env::new(IMAGE_BYTES, false);
    let acked = env.block.avail_features();
    env.block.set_acked_features(acked);
    let dq_mem = env.mem.clone();
    let mut dq = DriverQueue::new(&dq_mem);
    let event = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let notify = event.try_clone().unwrap();
    let interrupt = Arc::new(FakeInterrupt::default());
    let ctx = virtio_device::ActivateContext {
        mem: env.mem.clone(),
        queues: vec![dq.queue()],
        queue_events: vec![event],
        interrupt: interrupt.clone(),
        write_log: Some(interrupt.clone()),
    };
    env.block.activate(ctx).unwrap();
    env.header(VIRTIO_BLK_T_IN, 1);
    dq.add_chain(&[
        (HDR_GPA, 16, 0),
        (DATA_GPA, 512, WRITE),
        (STATUS_GPA, 1, WRITE),
    ]);
    notify.write(1).unwrap();
    assert!(wait_until(|| dq.used_idx() == 1));
    assert_eq!(env.status(), VIRTIO_BLK_S_OK);
    assert!(wait_until(|| interrupt.interrupts() == 1));
    // The data buffer and the status byte were reported as VMM writes.
    assert_eq!(interrupt.writes(), [(DATA_GPA, 512), (STATUS_GPA, 1)]);
    let state = env.block.save_state();
    assert!(state.activated);
    assert_eq!(state.queue.unwrap().next_used, 1);
    assert!(env.block.reset());
    assert!(!env.block.is_activated());
    assert!(!env.block.handle().status().activated);
}

#[test]
fn state_round_trips_and_refuses_another_disk_size() {
    let env = Env::new(IMAGE_BYTES, true);
    let mut state = env.block.save_state();
    let json = serde_json::to_string(&state).unwrap();
    let back: crate::BlockState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    let config = drive(env.file.path(), true);
    let restored = Block::restore(config.clone(), &state, &env.mem).unwrap();
    assert_eq!(restored.save_state(), state);

    // An activated state with a queue in guest memory restores and remembers the queue.
    let dq = DriverQueue::new(&env.mem);
    let mut saved = virtio_device::SavedQueue::from(dq.queue().state());
    saved.next_avail = 7;
    state.activated = true;
    state.acked_features = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_RO;
    state.queue = Some(saved);
    let restored = Block::restore(config.clone(), &state, &env.mem).unwrap();
    assert_eq!(restored.save_state().queue, Some(saved));
    assert!(restored.restored_queue().is_some());

    // A queue outside guest memory, features not offered, another size, another id.
    let mut bad = state.clone();
    bad.queue.as_mut().unwrap().used_ring = MEM_BYTES;
    assert!(matches!(
        Block::restore(config.clone(), &bad, &env.mem),
        Err(PersistError::BadQueue(_))
    ));
    let mut bad = state.clone();
    bad.acked_features |= VIRTIO_BLK_F_DISCARD;
    assert!(matches!(
        Block::restore(config.clone(), &bad, &env.mem),
        Err(PersistError::UnknownFeatures { .. })
    ));
    let mut bad = state.clone();
    bad.size_bytes += 512;
    let err = Block::restore(config.clone(), &bad, &env.mem).unwrap_err();
    assert!(matches!(err, PersistError::SizeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("the snapshot's disk was"), "{err}");
    let mut other = config.clone();
    other.drive_id = "other".into();
    assert!(matches!(
        Block::restore(other, &state, &env.mem),
        Err(PersistError::ConfigMismatch { .. })
    ));
    let mut bad = state.clone();
    bad.version = 2;
    assert!(matches!(
        Block::restore(config, &bad, &env.mem),
        Err(PersistError::UnsupportedVersion { .. })
    ));
}

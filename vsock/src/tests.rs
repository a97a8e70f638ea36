//! Device tests with mock queues and real host unix sockets: the packet protocol, the
//! Firecracker host convention, malformed guest packets, and snapshot state.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use virtio_device::VirtioDevice;
use vm_memory::{Bytes, GuestAddress};

use crate::connection::CONN_BUF_BYTES;
use crate::packet::*;
use crate::test_utils::*;
use crate::{PersistError, Vsock, VsockError, VsockState};

/// A device activated with three mock queues.
struct Rig<'a> {
    env: &'a Env,
    rx: DriverQueue<'a>,
    tx: DriverQueue<'a>,
    ev: DriverQueue<'a>,
    notify: Vec<vmm_sys_util::eventfd::EventFd>,
    rx_seen: u16,
}

fn rig(env: &mut Env) -> Vec<vmm_sys_util::eventfd::EventFd> {
    // Queues are created over `env.mem`, then handed to the device.
    let mem = env.mem.clone();
    let queues = (0..3)
        .map(|i| DriverQueue::new(&mem, queue_base(i)).queue())
        .collect();
    env.activate(queues)
}

impl<'a> Rig<'a> {
    /// Attaches driver views to queues the device already holds (same ring addresses).
    fn new(env: &'a Env, notify: Vec<vmm_sys_util::eventfd::EventFd>) -> Self {
        Rig {
            env,
            rx: DriverQueue::new(&env.mem, queue_base(0)),
            tx: DriverQueue::new(&env.mem, queue_base(1)),
            ev: DriverQueue::new(&env.mem, queue_base(2)),
            notify,
            rx_seen: 0,
        }
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        self.env.send(&mut self.tx, hdr, payload, &self.notify[1]);
    }

    fn send_raw(&mut self, hdr: Header, payload: &[u8]) {
        self.env
            .send_raw(&mut self.tx, &hdr, payload, &self.notify[1]);
    }

    fn add_rx(&mut self, n: usize) {
        self.env.add_rx(&mut self.rx, n, &self.notify[0]);
    }

    fn next_rx(&mut self) -> (Header, Vec<u8>) {
        let p = self.env.rx_packet(&self.rx, self.rx_seen);
        self.rx_seen += 1;
        p
    }

    /// The next packet that is not a credit update (those come whenever the device forwarded
    /// guest bytes).
    fn next_non_credit(&mut self) -> (Header, Vec<u8>) {
        loop {
            let p = self.next_rx();
            if p.0.op != OP_CREDIT_UPDATE {
                return p;
            }
        }
    }

    fn no_rx_within(&self, ms: u64) -> bool {
        std::thread::sleep(Duration::from_millis(ms));
        self.rx.used_idx() == self.rx_seen
    }

    fn wait_tx_used(&self, n: u16) {
        assert!(
            wait_until(|| self.tx.used_idx() >= n),
            "tx chains not completed"
        );
    }
}

/// Breaks one field of a saved state.
type Corruption = Box<dyn Fn(&mut VsockState)>;

fn counters(env: &Env) -> crate::VsockCounters {
    env.vsock.handle().status().counters
}

#[test]
fn config_space_is_the_guest_cid_and_queues_are_three() {
    let env = Env::new();
    let v = &env.vsock;
    assert_eq!(v.device_type(), 19);
    assert_eq!(v.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(v.avail_features(), virtio_device::VIRTIO_F_VERSION_1);
    let mut b = [0xffu8; 12];
    v.read_config(0, &mut b);
    assert_eq!(b, [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut b = [0u8; 2];
    v.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0, 0]);
}

#[test]
fn guest_connects_to_a_host_listener_and_data_flows_both_ways() {
    let mut env = Env::new();
    let host = UnixListener::bind(env.config.host_port_path(1234)).unwrap();
    let notify = rig(&mut env);
    let mut r = Rig::new(&env, notify);
    r.add_rx(8);
    r.send(env.guest_hdr(OP_REQUEST, 5000, 1234), &[]);
    let (h, _) = r.next_rx();
    assert_eq!(
        (h.op, h.src_port, h.dst_port, h.dst_cid),
        (OP_RESPONSE, 1234, 5000, GUEST_CID)
    );
    let (mut s, _) = host.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    r.send(env.guest_hdr(OP_RW, 5000, 1234), b"hello host");
    let mut got = [0u8; 10];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host");
    s.write_all(b"hello guest").unwrap();
    let (h, p) = r.next_non_credit();
    assert_eq!((h.op, p.as_slice()), (OP_RW, &b"hello guest"[..]));
    assert_eq!(h.buf_alloc, CONN_BUF_BYTES);
    // The guest closes: the host sees end of file and the guest gets its RST.
    r.send(
        Header {
            flags: SHUTDOWN_F_BOTH,
            ..env.guest_hdr(OP_SHUTDOWN, 5000, 1234)
        },
        &[],
    );
    assert_eq!(r.next_non_credit().0.op, OP_RST);
    assert_eq!(s.read(&mut got).unwrap(), 0);
    let c = counters(&env);
    assert_eq!(
        (
            c.guest_connects,
            c.active_connections,
            c.bytes_to_host,
            c.bytes_to_guest
        ),
        (1, 0, 10, 11)
    );
    assert!(env.write_log.bytes.load(Ordering::Relaxed) >= 3 * HDR_BYTES as u64 + 11);
}

#[test]
fn host_connect_line_reaches_the_guest_port_and_ok_comes_back() {
    let mut env = Env::new();
    let notify = rig(&mut env);
    let mut r = Rig::new(&env, notify);
    r.add_rx(8);
    let uds = env.config.uds_path.clone();
    let client = std::thread::spawn(move || {
        crate::connect_to_guest(&uds, 52, Some(Duration::from_secs(5))).unwrap()
    });
    let (h, _) = r.next_rx();
    assert_eq!((h.op, h.dst_port, h.src_cid), (OP_REQUEST, 52, HOST_CID));
    let local = h.src_port;
    r.send(env.guest_hdr(OP_RESPONSE, 52, local), &[]);
    let (mut s, ok_port) = client.join().unwrap();
    assert_eq!(ok_port, local);
    s.write_all(b"early").unwrap();
    let mut line = [0u8; 14];
    let (h, p) = r.next_rx();
    assert_eq!((h.op, p.as_slice()), (OP_RW, &b"early"[..]));
    // The host client vanishes: the guest gets SHUTDOWN(SEND), then finishing closes it.
    drop(s);
    let (h, _) = r.next_rx();
    assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_F_SEND));
    r.send(
        Header {
            flags: SHUTDOWN_F_BOTH,
            ..env.guest_hdr(OP_SHUTDOWN, 52, local)
        },
        &[],
    );
    assert_eq!(r.next_rx().0.op, OP_RST);
    // A guest that refuses (RST) closes the host client: the client reports it.
    let uds = env.config.uds_path.clone();
    let client =
        std::thread::spawn(move || crate::connect_to_guest(&uds, 53, Some(Duration::from_secs(5))));
    let (h, _) = r.next_rx();
    assert_eq!((h.op, h.dst_port), (OP_REQUEST, 53));
    r.send(env.guest_hdr(OP_RST, 53, h.src_port), &[]);
    let err = client.join().unwrap().unwrap_err();
    assert!(
        matches!(err, crate::ClientError::Refused { port: 53 }),
        "{err}"
    );
    // A bad line is refused without harm; the device keeps serving.
    let mut bad = UnixStream::connect(&env.config.uds_path).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    bad.write_all(b"HELLO\n").unwrap();
    assert_eq!(bad.read(&mut line).unwrap(), 0);
    assert!(r.no_rx_within(50));
    assert_eq!(counters(&env).host_connects, 2);
}

#[test]
fn guest_refused_without_host_listener_and_rst_for_unknown_connections() {
    let mut env = Env::new();
    let notify = rig(&mut env);
    let mut r = Rig::new(&env, notify);
    r.add_rx(8);
    r.send(env.guest_hdr(OP_REQUEST, 7, 999), &[]);
    let (h, _) = r.next_rx();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 999, 7));
    r.send(env.guest_hdr(OP_RW, 7, 999), b"data");
    assert_eq!(r.next_rx().0.op, OP_RST);
    // An RST for nothing gets no answer.
    r.send(env.guest_hdr(OP_RST, 7, 999), &[]);
    assert!(r.no_rx_within(50));
}

#[test]
fn wrong_cids_are_dropped_and_unknown_ops_or_types_get_rst() {
    let mut env = Env::new();
    let notify = rig(&mut env);
    let mut r = Rig::new(&env, notify);
    r.add_rx(8);
    r.send(
        Header {
            src_cid: 99,
            ..env.guest_hdr(OP_REQUEST, 1, 2)
        },
        &[],
    );
    r.send(
        Header {
            dst_cid: 7,
            ..env.guest_hdr(OP_REQUEST, 1, 2)
        },
        &[],
    );
    r.send(
        Header {
            dst_cid: GUEST_CID,
            ..env.guest_hdr(OP_RW, 1, 2)
        },
        b"x",
    );
    r.wait_tx_used(3);
    assert!(r.no_rx_within(50));
    assert_eq!(counters(&env).packets_dropped, 3);
    r.send(env.guest_hdr(42, 1, 2), &[]);
    assert_eq!(r.next_rx().0.op, OP_RST);
    r.send(
        Header {
            type_: 9,
            ..env.guest_hdr(OP_REQUEST, 1, 2)
        },
        &[],
    );
    assert_eq!(r.next_rx().0.op, OP_RST);
    // An unknown op on an open connection resets it.
    let host = UnixListener::bind(env.config.host_port_path(80)).unwrap();
    r.send(env.guest_hdr(OP_REQUEST, 3, 80), &[]);
    assert_eq!(r.next_rx().0.op, OP_RESPONSE);
    let (mut s, _) = host.accept().unwrap();
    r.send(env.guest_hdr(0, 3, 80), &[]);
    assert_eq!(r.next_rx().0.op, OP_RST);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(s.read(&mut [0u8; 4]).unwrap(), 0);
}

#[test]
fn bad_lengths_short_headers_and_chains_outside_memory_are_dropped() {
    let mut env = Env::new();
    let notify = rig(&mut env);
    let mut r = Rig::new(&env, notify);
    // rx buffers too small or outside memory are skipped (used, 0 bytes); good ones follow.
    let gpa = env.alloc();
    r.rx.add_chain(&[(gpa, 10, WRITE)]);
    r.rx.add_chain(&[(MEM_BYTES + 4096, 4096, WRITE)]);
    r.add_rx(8);
    // The header claims more bytes than the chain has: RST.
    r.send_raw(
        Header {
            len: 1000,
            ..env.guest_hdr(OP_RW, 1, 2)
        },
        b"short",
    );
    assert!(wait_until(|| r.rx.used_idx() >= 3));
    assert_eq!((r.rx.used(0).1, r.rx.used(1).1), (0, 0));
    r.rx_seen = 2;
    assert_eq!(r.next_rx().0.op, OP_RST);
    // More than the largest packet: RST.
    r.send_raw(
        Header {
            len: u32::MAX,
            ..env.guest_hdr(OP_RW, 1, 2)
        },
        b"",
    );
    assert_eq!(r.next_rx().0.op, OP_RST);
    // Too short for a header: dropped.
    let gpa = env.alloc();
    r.tx.add_chain(&[(gpa, 20, 0)]);
    // A descriptor outside guest memory, one straddling its end, one wrapping: dropped.
    r.tx.add_chain(&[(MEM_BYTES + 0x1000, 64, 0)]);
    r.tx.add_chain(&[(MEM_BYTES - 10, 64, 0)]);
    r.tx.add_chain(&[(u64::MAX - 8, 64, 0)]);
    // A device-writable-only chain: nothing to read.
    r.tx.add_chain(&[(gpa, 64, WRITE)]);
    r.notify[1].write(1).unwrap();
    r.wait_tx_used(7);
    assert!(r.no_rx_within(50));
    assert_eq!(counters(&env).packets_dropped, 7);
    // The device keeps serving.
    r.send(env.guest_hdr(OP_REQUEST, 1, 3), &[]);
    assert_eq!(r.next_rx().0.op, OP_RST);
}

#[test]
fn a_guest_overrunning_its_credit_is_reset() {
    let mut env = Env::new();
    let host = UnixListener::bind(env.config.host_port_path(81)).unwrap();
    let notify = rig(&mut env);
    let mut r = Rig::new(&env, notify);
    r.add_rx(8);
    r.send(env.guest_hdr(OP_REQUEST, 4, 81), &[]);
    assert_eq!(r.next_rx().0.op, OP_RESPONSE);
    let (_s, _) = host.accept().unwrap();
    // The host never reads: after the socket buffer fills, guest data piles up to the
    // advertised buf_alloc, then the connection is reset instead of buffering more.
    let chunk = vec![7u8; MAX_PAYLOAD_BYTES];
    let mut sent = 0;
    while sent < 64 << 20 {
        r.send(env.guest_hdr(OP_RW, 4, 81), &chunk);
        sent += chunk.len();
        r.wait_tx_used((sent / chunk.len()) as u16 + 1);
        if counters(&env).rsts_sent > 0 {
            break;
        }
    }
    assert!(counters(&env).rsts_sent > 0, "no reset after {sent} bytes");
    assert!(sent < 64 << 20);
}

#[test]
fn socket_path_in_use_is_refused_and_stale_files_replaced() {
    let env = Env::new();
    let err = Vsock::new(env.config.clone()).unwrap_err();
    assert!(matches!(err, VsockError::PathInUse { .. }), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let config = crate::VsockConfig {
        uds_path: path.clone(),
        ..env.config.clone()
    };
    let v = Vsock::new(config.clone()).unwrap();
    drop(v);
    assert!(!path.exists(), "the socket file is removed with the device");
    std::fs::write(&path, b"not a socket").unwrap();
    assert!(matches!(
        Vsock::new(config).unwrap_err(),
        VsockError::NotASocket { .. }
    ));
}

#[test]
fn save_resets_connections_and_restore_sends_a_transport_reset() {
    let mut env = Env::new();
    let host = UnixListener::bind(env.config.host_port_path(82)).unwrap();
    let notify = rig(&mut env);
    let mut r = Rig::new(&env, notify);
    r.add_rx(8);
    r.send(env.guest_hdr(OP_REQUEST, 5, 82), &[]);
    assert_eq!(r.next_rx().0.op, OP_RESPONSE);
    let (mut s, _) = host.accept().unwrap();
    let state = env.vsock.save_state();
    assert_eq!(r.next_rx().0.op, OP_RST);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(s.read(&mut [0u8; 4]).unwrap(), 0, "the host side is closed");
    assert!(state.activated && state.queues.len() == 3);
    let json = serde_json::to_string(&state).unwrap();
    let state: VsockState = serde_json::from_str(&json).unwrap();

    // Restore into a fresh device on another path, same CID.
    let dir = tempfile::tempdir().unwrap();
    let config = crate::VsockConfig {
        uds_path: dir.path().join("r.sock"),
        ..env.config.clone()
    };
    let mut restored = Vsock::restore(config.clone(), &state, &env.mem).unwrap();
    let queues = restored.restored_queues().unwrap();
    assert_eq!(queues.len(), 3);
    // The guest has an event buffer; activation delivers the reset event.
    let gpa = env.alloc();
    env.mem
        .write_slice(&[0xffu8; 4], GuestAddress(gpa))
        .unwrap();
    r.ev.add_chain(&[(gpa, 8, WRITE)]);
    let events: Vec<_> = (0..3)
        .map(|_| vmm_sys_util::eventfd::EventFd::new(0).unwrap())
        .collect();
    restored
        .activate(virtio_device::ActivateContext {
            mem: env.mem.clone(),
            queues,
            queue_events: events,
            interrupt: env.interrupt.clone(),
            write_log: None,
        })
        .unwrap();
    assert!(wait_until(|| r.ev.used_idx() == 1));
    assert_eq!(r.ev.used(0).1, 4);
    let mut id = [0u8; 4];
    env.mem.read_slice(&mut id, GuestAddress(gpa)).unwrap();
    assert_eq!(u32::from_le_bytes(id), EVENT_TRANSPORT_RESET);
    assert_eq!(restored.handle().status().counters.transport_resets_sent, 1);
    drop(restored);

    // Corrupted states are refused with the reason.
    let cases: Vec<(&str, Corruption)> = vec![
        ("version", Box::new(|s| s.version = 99)),
        ("CID", Box::new(|s| s.guest_cid = 4)),
        ("features", Box::new(|s| s.acked_features = 1)),
        (
            "queues",
            Box::new(|s| s.queues.pop().map(drop).unwrap_or(())),
        ),
        ("outside", Box::new(|s| s.queues[0].used_ring = MEM_BYTES)),
        ("size", Box::new(|s| s.queues[1].size = 3)),
        (
            "apart",
            Box::new(|s| s.queues[2].next_avail = s.queues[2].next_used.wrapping_add(300)),
        ),
    ];
    for (what, corrupt) in cases {
        let mut bad = state.clone();
        corrupt(&mut bad);
        let err = Vsock::restore(config.clone(), &bad, &env.mem).err();
        assert!(
            matches!(
                err,
                Some(PersistError::UnsupportedVersion { .. })
                    | Some(PersistError::CidMismatch { .. })
                    | Some(PersistError::BadFeatures { .. })
                    | Some(PersistError::QueueCount { .. })
                    | Some(PersistError::InvalidQueue { .. })
            ),
            "{what}: {err:?}"
        );
    }
}

#[test]
fn many_connections_share_the_rx_queue_fairly() {
    let mut env = Env::new();
    let host = UnixListener::bind(env.config.host_port_path(90)).unwrap();
    let notify = rig(&mut env);
    let mut r = Rig::new(&env, notify);
    r.add_rx(64);
    let n = 20u32;
    for port in 0..n {
        r.send(env.guest_hdr(OP_REQUEST, 100 + port, 90), &[]);
    }
    let mut streams = Vec::new();
    for _ in 0..n {
        assert_eq!(r.next_rx().0.op, OP_RESPONSE);
        streams.push(host.accept().unwrap().0);
    }
    for (i, s) in streams.iter_mut().enumerate() {
        s.write_all(format!("conn{i:02}").as_bytes()).unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        let (h, p) = r.next_rx();
        assert_eq!(h.op, OP_RW);
        assert_eq!(p, format!("conn{:02}", h.dst_port - 100).into_bytes());
        seen.insert(h.dst_port);
    }
    assert_eq!(seen.len(), n as usize);
    assert_eq!(counters(&env).active_connections, u64::from(n));
}

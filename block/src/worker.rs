//! The device's worker thread and the queue processing it runs.
//!
//! One thread per activation waits (epoll) on the queue notification and the control eventfd.
//! Each pass pops every available chain, carries out the request synchronously and completes
//! it, all under the queue's lock: whoever holds the lock (e.g. `save_state` while the VM is
//! paused) sees no request in flight.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_device::{GuestWriteLog, Interrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{lock, Shared};
use crate::execute::{Counters, ExecCtx};
use crate::request::{self, Limits};

/// Epoll token of the control eventfd.
const CONTROL_TOKEN: u64 = u64::MAX;
/// Epoll token of the queue notification.
const QUEUE_TOKEN: u64 = 0;

/// The active queue and what processing it needs.
pub(crate) struct ActiveQueue {
    /// Guest memory.
    pub(crate) mem: GuestMemoryMmap,
    /// The request queue.
    pub(crate) queue: Queue,
    /// Where to report guest memory the device writes.
    pub(crate) write_log: Option<Arc<dyn GuestWriteLog>>,
    /// Request limits from the negotiated features.
    pub(crate) limits: Limits,
}

impl ActiveQueue {
    /// Serves every available request; returns how many were completed.
    pub(crate) fn process(&mut self, shared: &Shared) -> usize {
        let ActiveQueue {
            mem,
            queue,
            write_log,
            limits,
        } = self;
        let ctx = ExecCtx {
            disk: &shared.disk,
            mem,
            serial: &shared.serial,
            write_log: write_log.as_ref(),
            counters: &shared.counters,
        };
        let mut completed = 0;
        while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let used_len = match request::parse(chain, mem, limits) {
                Ok(parsed) => {
                    let (status, written) = match &parsed.request {
                        Ok(req) if req.is_write() && shared.disk.read_only() => {
                            Counters::add(&shared.counters.invalid_requests, 1);
                            tracing::debug!(head, "virtio-blk: write to a read-only disk refused");
                            (request::VIRTIO_BLK_S_IOERR, 0)
                        }
                        Ok(req) => ctx.execute(req),
                        Err(err) => {
                            Counters::add(&shared.counters.invalid_requests, 1);
                            tracing::debug!(head, %err, "virtio-blk: request refused");
                            (err.status(), 0)
                        }
                    };
                    // Checked in guest memory by `parse`.
                    if mem
                        .write_obj(status, GuestAddress(parsed.status_gpa))
                        .is_ok()
                    {
                        ctx.log(parsed.status_gpa, 1);
                    }
                    // Bounded by the chain's length (< 2^32).
                    u32::try_from(written + 1).unwrap_or(u32::MAX)
                }
                Err(err) => {
                    Counters::add(&shared.counters.invalid_chains, 1);
                    tracing::debug!(head, %err, "virtio-blk: chain without a status byte");
                    0
                }
            };
            if let Err(err) = queue.add_used(&*mem, head, used_len) {
                tracing::warn!(head, %err, "virtio-blk: cannot complete a request; queue stopped");
                break;
            }
            completed += 1;
        }
        completed
    }

    /// Processes the queue and interrupts the guest if anything was completed.
    pub(crate) fn process_and_notify(&mut self, shared: &Shared, interrupt: &dyn Interrupt) {
        if self.process(shared) == 0 {
            return;
        }
        // Without VIRTIO_RING_F_EVENT_IDX this is always true; on error, interrupt anyway.
        if !self.queue.needs_notification(&self.mem).unwrap_or(true) {
            return;
        }
        if let Err(err) = interrupt.signal_used_queue(0) {
            tracing::warn!(%err, "virtio-blk: cannot interrupt the guest");
        }
    }
}

/// A running worker thread.
pub(crate) struct WorkerHandle {
    thread: JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

impl WorkerHandle {
    /// Stops the thread and waits for it.
    pub(crate) fn stop(self, control_evt: &EventFd) {
        self.stop.store(true, Ordering::Release);
        if let Err(err) = control_evt.write(1) {
            tracing::error!(%err, "virtio-blk: cannot wake the worker to stop it");
        }
        if self.thread.join().is_err() {
            tracing::error!("virtio-blk: the worker thread panicked");
        }
    }
}

/// Starts the worker serving `active`, woken by `queue_event`.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    active: Arc<Mutex<ActiveQueue>>,
    queue_event: EventFd,
    interrupt: Arc<dyn Interrupt>,
) -> std::io::Result<WorkerHandle> {
    let epoll = Epoll::new()?;
    for (fd, token) in [
        (queue_event.as_raw_fd(), QUEUE_TOKEN),
        (shared.control_evt.as_raw_fd(), CONTROL_TOKEN),
    ] {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stop_flag = stop.clone();
    let name = format!("blk-{}", shared.config.drive_id);
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        virtio_device::worker_thread_started();
        // The guest may have notified before the worker ran.
        lock(&active).process_and_notify(&shared, &*interrupt);
        let mut events = [EpollEvent::default(); 2];
        while !stop_flag.load(Ordering::Acquire) {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    tracing::error!(%err, "virtio-blk: epoll failed; worker stops");
                    return;
                }
            };
            for event in &events[..n] {
                if event.data() == CONTROL_TOKEN {
                    // Non-blocking: a concurrent read may have emptied it.
                    let _ = shared.control_evt.read();
                } else {
                    let _ = queue_event.read();
                    lock(&active).process_and_notify(&shared, &*interrupt);
                }
            }
        }
    })?;
    Ok(WorkerHandle { thread, stop })
}

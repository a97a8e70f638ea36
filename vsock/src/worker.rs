//! The device's worker thread: one epoll over the three queue notifications, the control
//! eventfd, the host listener and every host socket. Each wake-up handles its events, then
//! pumps: tx packets to the muxer, what the muxer owes the guest into rx buffers, a pending
//! transport reset into the event queue, and interrupts.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_device::{GuestWriteLog, Interrupt};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{lock, Counters, Shared, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::limiter::guest_warn;
use crate::muxer::{complete, Muxer, LISTENER_TOKEN};
use crate::packet::{self, RxBuffer, EVENT_BYTES, EVENT_TRANSPORT_RESET};

/// Epoll token of the control eventfd.
const CONTROL_TOKEN: u64 = 3;
/// Events taken per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 64;

/// An active device: its queues, guest memory and connections.
pub(crate) struct Active {
    pub(crate) mem: GuestMemoryMmap,
    /// rx, tx, event.
    pub(crate) queues: Vec<Queue>,
    pub(crate) muxer: Muxer,
    pub(crate) interrupt: Arc<dyn Interrupt>,
    pub(crate) write_log: Option<Arc<dyn GuestWriteLog>>,
    /// A `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` is owed (after a restore).
    pub(crate) reset_event_pending: bool,
    pub(crate) counters: Arc<Counters>,
}

impl Active {
    /// Handles every available tx packet. Returns the chains completed.
    pub(crate) fn process_tx(&mut self) -> usize {
        let Active {
            mem, queues, muxer, ..
        } = self;
        let queue = &mut queues[TX_QUEUE];
        let mut used = 0;
        loop {
            let chain = match queue.iter(&*mem) {
                Ok(mut iter) => iter.next(),
                Err(err) => {
                    guest_warn!(muxer.warnings, %err, "vsock: tx queue unusable; processing stopped");
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            match packet::read_tx(mem, chain) {
                Ok((hdr, payload)) => muxer.handle_guest_packet(hdr, payload),
                Err(err) => match err.header().copied() {
                    Some(hdr) => muxer.reject(&hdr, &err),
                    None => {
                        self.counters
                            .packets_dropped
                            .fetch_add(1, Ordering::Relaxed);
                        guest_warn!(muxer.warnings, %err, head, "vsock: malformed tx chain dropped");
                    }
                },
            }
            if let Err(err) = complete(queue, mem, head, 0) {
                guest_warn!(muxer.warnings, %err, "vsock: cannot complete a tx chain");
                break;
            }
            used += 1;
        }
        used
    }

    /// Fills rx buffers with what the muxer owes the guest. Returns the chains completed.
    pub(crate) fn process_rx(&mut self) -> usize {
        let Active {
            mem,
            queues,
            muxer,
            write_log,
            ..
        } = self;
        match muxer.fill_rx(&mut queues[RX_QUEUE], mem, write_log.as_deref()) {
            Ok(n) => n,
            Err(err) => {
                guest_warn!(muxer.warnings, %err, "vsock: rx queue unusable; processing stopped");
                0
            }
        }
    }

    /// Delivers a pending transport reset event. Returns the chains completed.
    pub(crate) fn process_event(&mut self) -> usize {
        if !self.reset_event_pending {
            return 0;
        }
        let Active {
            mem,
            queues,
            muxer,
            write_log,
            ..
        } = self;
        let queue = &mut queues[EVENT_QUEUE];
        let chain = match queue.iter(&*mem) {
            Ok(mut iter) => iter.next(),
            Err(err) => {
                guest_warn!(muxer.warnings, %err, "vsock: event queue unusable");
                return 0;
            }
        };
        let Some(chain) = chain else { return 0 };
        let head = chain.head_index();
        let mut len = 0;
        match RxBuffer::new(mem, chain, write_log.is_some()) {
            Ok(mut buf) if buf.capacity() >= EVENT_BYTES => {
                match buf.write(&EVENT_TRANSPORT_RESET.to_le_bytes()) {
                    Ok(()) => {
                        if let Some(log) = write_log {
                            buf.log_written(&**log);
                        }
                        len = EVENT_BYTES as u32;
                        self.reset_event_pending = false;
                        self.counters
                            .transport_resets_sent
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!("vsock: transport reset event delivered to the guest");
                    }
                    Err(err) => guest_warn!(muxer.warnings, %err, "vsock: cannot write an event"),
                }
            }
            _ => guest_warn!(muxer.warnings, head, "vsock: unusable event buffer skipped"),
        }
        match complete(queue, mem, head, len) {
            Ok(()) => 1,
            Err(err) => {
                guest_warn!(muxer.warnings, %err, "vsock: cannot complete an event buffer");
                0
            }
        }
    }

    /// One pass over the queues (tx only when `tx`), interrupting the guest as needed.
    pub(crate) fn pump(&mut self, tx: bool) {
        let tx_used = if tx { self.process_tx() } else { 0 };
        let rx_used = self.process_rx();
        let event_used = self.process_event();
        for (index, used) in [
            (RX_QUEUE, rx_used),
            (TX_QUEUE, tx_used),
            (EVENT_QUEUE, event_used),
        ] {
            if used == 0 {
                continue;
            }
            // Without VIRTIO_RING_F_EVENT_IDX this is always true; on error, interrupt anyway.
            if !self.queues[index]
                .needs_notification(&self.mem)
                .unwrap_or(true)
            {
                continue;
            }
            if let Err(err) = self.interrupt.signal_used_queue(index as u16) {
                guest_warn!(self.muxer.warnings, %err, "vsock: cannot interrupt the guest");
            }
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
            tracing::error!(%err, "vsock: cannot wake the worker to stop it");
        }
        if self.thread.join().is_err() {
            tracing::error!("vsock: the worker thread panicked");
        }
    }
}

/// Builds the active device and starts its worker.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    listener: Arc<UnixListener>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<dyn Interrupt>,
    write_log: Option<Arc<dyn GuestWriteLog>>,
    restored: bool,
) -> std::io::Result<(Arc<Mutex<Active>>, WorkerHandle)> {
    let epoll = Arc::new(Epoll::new()?);
    for (i, evt) in queue_events.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, i as u64),
        )?;
    }
    let control_evt = shared.control_evt.try_clone()?;
    epoll.ctl(
        ControlOperation::Add,
        control_evt.as_raw_fd(),
        EpollEvent::new(EventSet::IN, CONTROL_TOKEN),
    )?;
    let muxer = Muxer::new(
        shared.config.clone(),
        listener,
        epoll.clone(),
        shared.counters.clone(),
    )?;
    let active = Arc::new(Mutex::new(Active {
        mem,
        queues,
        muxer,
        interrupt,
        write_log,
        reset_event_pending: restored,
        counters: shared.counters.clone(),
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let worker = Worker {
        active: active.clone(),
        epoll,
        queue_events,
        control_evt,
        stop: stop.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("vsock".into())
        .spawn(move || {
            virtio_device::worker_thread_started();
            worker.run()
        })?;
    Ok((active, WorkerHandle { thread, stop }))
}

/// The worker thread's state.
struct Worker {
    active: Arc<Mutex<Active>>,
    epoll: Arc<Epoll>,
    queue_events: Vec<EventFd>,
    control_evt: EventFd,
    stop: Arc<AtomicBool>,
}

impl Worker {
    fn run(self) {
        lock(&self.active).pump(true);
        let mut events = vec![EpollEvent::default(); EVENTS_PER_WAIT];
        while !self.stop.load(Ordering::Acquire) {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    tracing::error!(%err, "vsock: epoll failed; worker stops");
                    return;
                }
            };
            let mut active = lock(&self.active);
            let mut tx = false;
            for event in &events[..n] {
                match event.data() {
                    CONTROL_TOKEN => {
                        // Non-blocking: a concurrent read may have emptied it.
                        let _ = self.control_evt.read();
                        if self.stop.load(Ordering::Acquire) {
                            return;
                        }
                    }
                    LISTENER_TOKEN => active.muxer.accept(),
                    token if (token as usize) < self.queue_events.len() => {
                        let _ = self.queue_events[token as usize].read();
                        tx |= token as usize == TX_QUEUE;
                    }
                    token => active.muxer.stream_event(token, event.event_set()),
                }
            }
            active.pump(tx);
        }
    }
}

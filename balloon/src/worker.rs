//! The device's worker thread.
//!
//! One thread per activation waits (epoll) on the queue notifications, the statistics timer
//! and the control eventfd; it processes queues and interrupts the guest. The queues live in an
//! [`ActiveQueues`] behind a mutex so `save_state` sees them between two passes.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_device::Interrupt;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{lock, Shared};
use crate::queues::{deflate, drain_queue, hint, inflate, report, stats, BalloonQueue, QueueCtx};
use crate::ratelimit::{guest_warn, LogLimiter};

/// Epoll token of the control eventfd.
const CONTROL_TOKEN: u64 = u64::MAX;
/// Epoll token of the statistics timer.
const TIMER_TOKEN: u64 = u64::MAX - 1;

/// One queue the guest set up.
pub(crate) struct ActiveQueue {
    /// What it is.
    pub(crate) kind: BalloonQueue,
    /// Its transport index (for interrupts).
    pub(crate) index: u16,
    /// The queue.
    pub(crate) queue: Queue,
}

/// The queues of an active device and the guest memory they live in.
pub(crate) struct ActiveQueues {
    /// Guest memory.
    pub(crate) mem: GuestMemoryMmap,
    /// In queue-index order.
    pub(crate) queues: Vec<ActiveQueue>,
    /// Head of the statistics buffer the device holds.
    pub(crate) stats_desc: Option<u16>,
}

impl ActiveQueues {
    /// Processes the queue at position `pos` and interrupts the guest as needed.
    pub(crate) fn process(
        &mut self,
        pos: usize,
        shared: &Shared,
        interrupt: &dyn Interrupt,
        limiter: &mut LogLimiter,
    ) {
        let ActiveQueues {
            mem,
            queues,
            stats_desc,
        } = self;
        let Some(active) = queues.get_mut(pos) else {
            return;
        };
        let mut ctx = QueueCtx {
            mem,
            shared,
            limiter,
            config_changed: false,
        };
        let queue = &mut active.queue;
        let result = match active.kind {
            BalloonQueue::Inflate => drain_queue(queue, mem, |head, chain| {
                inflate::handle_chain(&mut ctx, head, chain)
            }),
            BalloonQueue::Deflate => drain_queue(queue, mem, |head, chain| {
                deflate::handle_chain(&mut ctx, head, chain)
            }),
            BalloonQueue::Reporting => drain_queue(queue, mem, |head, chain| {
                report::handle_chain(&mut ctx, head, chain)
            }),
            BalloonQueue::FreePageHint => drain_queue(queue, mem, |head, chain| {
                hint::handle_chain(&mut ctx, head, chain)
            }),
            BalloonQueue::Stats => stats::process_queue(&mut ctx, queue, stats_desc),
        };
        let config_changed = ctx.config_changed;
        match result {
            Ok(0) => {}
            Ok(_) => notify(queue, mem, active.index, interrupt, limiter),
            Err(err) => {
                guest_warn!(
                    limiter,
                    queue = active.kind.name(),
                    %err,
                    "balloon: cannot complete buffers; queue processing stopped"
                );
            }
        }
        if config_changed {
            if let Err(err) = interrupt.signal_config_change() {
                tracing::error!(%err, "balloon: cannot signal a configuration change");
            }
        }
    }

    /// Processes every queue (at start, in case the guest notified before the worker ran).
    pub(crate) fn process_all(
        &mut self,
        shared: &Shared,
        interrupt: &dyn Interrupt,
        limiter: &mut LogLimiter,
    ) {
        for pos in 0..self.queues.len() {
            self.process(pos, shared, interrupt, limiter);
        }
    }

    /// Returns the held statistics buffer so the guest refreshes it.
    pub(crate) fn request_stats(&mut self, interrupt: &dyn Interrupt, limiter: &mut LogLimiter) {
        let ActiveQueues {
            mem,
            queues,
            stats_desc,
        } = self;
        let Some(active) = queues.iter_mut().find(|q| q.kind == BalloonQueue::Stats) else {
            return;
        };
        match stats::request_update(mem, &mut active.queue, stats_desc) {
            Ok(true) => notify(&mut active.queue, mem, active.index, interrupt, limiter),
            Ok(false) => {}
            Err(err) => {
                guest_warn!(limiter, %err, "balloon: cannot return the statistics buffer");
            }
        }
    }
}

/// Interrupts the guest for queue `index` if the driver wants it.
fn notify(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    index: u16,
    interrupt: &dyn Interrupt,
    limiter: &mut LogLimiter,
) {
    // Without VIRTIO_RING_F_EVENT_IDX this is always true; on error, interrupt anyway.
    if !queue.needs_notification(mem).unwrap_or(true) {
        return;
    }
    if let Err(err) = interrupt.signal_used_queue(index) {
        guest_warn!(limiter, index, %err, "balloon: cannot interrupt the guest");
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
            tracing::error!(%err, "balloon: cannot wake the worker to stop it");
        }
        if self.thread.join().is_err() {
            tracing::error!("balloon: the worker thread panicked");
        }
    }
}

/// The worker thread's state.
struct Worker {
    shared: Arc<Shared>,
    active: Arc<Mutex<ActiveQueues>>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<dyn Interrupt>,
    stop: Arc<AtomicBool>,
    epoll: Epoll,
    timer: Option<TimerFd>,
    timer_interval_s: u16,
    limiter: LogLimiter,
}

/// Starts the worker for `active`, woken by `queue_events` (one per queue, same order).
pub(crate) fn spawn(
    shared: Arc<Shared>,
    active: Arc<Mutex<ActiveQueues>>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<dyn Interrupt>,
) -> std::io::Result<WorkerHandle> {
    let epoll = Epoll::new()?;
    let add = |fd: i32, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    for (i, evt) in queue_events.iter().enumerate() {
        add(evt.as_raw_fd(), i as u64)?;
    }
    add(shared.control_evt.as_raw_fd(), CONTROL_TOKEN)?;
    let has_stats = lock(&active)
        .queues
        .iter()
        .any(|q| q.kind == BalloonQueue::Stats);
    let timer = if has_stats {
        let timer = TimerFd::new()?;
        add(timer.as_raw_fd(), TIMER_TOKEN)?;
        Some(timer)
    } else {
        None
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut worker = Worker {
        shared,
        active,
        queue_events,
        interrupt,
        stop: stop.clone(),
        epoll,
        timer,
        timer_interval_s: 0,
        limiter: LogLimiter::new(),
    };
    worker.update_timer();
    let thread = std::thread::Builder::new()
        .name("balloon".into())
        .spawn(move || {
            virtio_device::worker_thread_started();
            worker.run()
        })?;
    Ok(WorkerHandle { thread, stop })
}

impl Worker {
    fn run(mut self) {
        lock(&self.active).process_all(&self.shared, &*self.interrupt, &mut self.limiter);
        let mut events = vec![EpollEvent::default(); self.queue_events.len() + 2];
        while !self.stop.load(Ordering::Acquire) {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    tracing::error!(%err, "balloon: epoll failed; worker stops");
                    return;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    CONTROL_TOKEN => {
                        // Non-blocking: a concurrent read may have emptied it.
                        let _ = self.shared.control_evt.read();
                        if self.stop.load(Ordering::Acquire) {
                            return;
                        }
                        self.update_timer();
                    }
                    TIMER_TOKEN => {
                        if let Some(timer) = &mut self.timer {
                            // Readable per epoll, so this does not block.
                            let _ = timer.wait();
                        }
                        lock(&self.active).request_stats(&*self.interrupt, &mut self.limiter);
                    }
                    token => {
                        let pos = token as usize;
                        if let Some(evt) = self.queue_events.get(pos) {
                            let _ = evt.read();
                        }
                        lock(&self.active).process(
                            pos,
                            &self.shared,
                            &*self.interrupt,
                            &mut self.limiter,
                        );
                    }
                }
            }
        }
    }

    /// Arms the statistics timer with the current polling interval.
    fn update_timer(&mut self) {
        let Some(timer) = &mut self.timer else {
            return;
        };
        let interval_s = lock(&self.shared.state).stats_polling_interval_s;
        if interval_s == self.timer_interval_s {
            return;
        }
        let result = if interval_s == 0 {
            timer.clear()
        } else {
            let period = Duration::from_secs(u64::from(interval_s));
            timer.reset(period, Some(period))
        };
        match result {
            Ok(()) => self.timer_interval_s = interval_s,
            Err(err) => tracing::error!(%err, "balloon: cannot arm the statistics timer"),
        }
    }
}

//! A device's worker thread with pause, resume and stop: one routine for every device crate.
//!
//! The worker's loop asks its [`WorkerGate`] at the top of every pass whether to go on; the
//! gate parks the thread while the device is paused (a snapshot saves device state and scans
//! guest memory meanwhile: a parked worker neither writes guest memory nor moves queue
//! indices). [`WorkerHandle::pause`] returns once the worker is parked (or has ended), so the
//! caller knows nothing is in flight. The device wakes a worker blocked in `epoll_wait` through
//! its control eventfd.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// What the handle asks of the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct State {
    request: Request,
    /// The worker waits in the gate.
    parked: bool,
    /// The worker's body returned.
    ended: bool,
}

#[derive(Debug)]
struct Control {
    state: Mutex<State>,
    changed: Condvar,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why a worker could not be paused.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Waking the worker (its control eventfd) failed.
    #[error("cannot wake the {name} worker")]
    Wake {
        /// The worker's name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The worker did not park in time (it is stuck serving a request).
    #[error("the {name} worker did not pause within {timeout_ms} ms")]
    Timeout {
        /// The worker's name.
        name: String,
        /// How long the caller waited.
        timeout_ms: u64,
    },
}

/// The worker thread's side: ask it at the top of every loop pass.
#[derive(Clone, Debug)]
pub struct WorkerGate {
    control: Arc<Control>,
}

impl WorkerGate {
    /// Whether the worker goes on: parks while the device is paused (until resumed or
    /// stopped); `false` once it must stop.
    pub fn proceed(&self) -> bool {
        let mut state = self.control.lock();
        while state.request == Request::Pause {
            if !state.parked {
                state.parked = true;
                self.control.changed.notify_all();
            }
            state = self
                .control
                .changed
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        if state.parked {
            state.parked = false;
            self.control.changed.notify_all();
        }
        state.request == Request::Run
    }

    /// Whether the worker must stop (without parking), for checks inside a pass.
    pub fn stopping(&self) -> bool {
        self.control.lock().request == Request::Stop
    }
}

/// A running worker thread.
#[derive(Debug)]
pub struct WorkerHandle {
    name: String,
    thread: JoinHandle<()>,
    control: Arc<Control>,
    wake: EventFd,
}

impl WorkerHandle {
    /// Starts thread `name` running `body`, which must loop `while gate.proceed()` and wait
    /// for `wake` (a clone of the device's control eventfd) among its events.
    pub fn spawn(
        name: &str,
        wake: &EventFd,
        body: impl FnOnce(WorkerGate) + Send + 'static,
    ) -> std::io::Result<Self> {
        let control = Arc::new(Control {
            state: Mutex::new(State {
                request: Request::Run,
                parked: false,
                ended: false,
            }),
            changed: Condvar::new(),
        });
        let gate = WorkerGate {
            control: control.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                // The VMM's per-thread set-up (its seccomp filter) before any device work.
                crate::worker_thread_started();
                let control = gate.control.clone();
                body(gate);
                control.lock().ended = true;
                control.changed.notify_all();
            })?;
        Ok(Self {
            name: name.to_string(),
            thread,
            control,
            wake: wake.try_clone()?,
        })
    }

    /// Parks the worker; returns once it waits in its gate (or has ended).
    pub fn pause(&self, timeout: Duration) -> Result<(), WorkerError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.control.lock();
        if state.request == Request::Stop {
            return Ok(());
        }
        state.request = Request::Pause;
        drop(state);
        self.wake.write(1).map_err(|source| WorkerError::Wake {
            name: self.name.clone(),
            source,
        })?;
        let mut state = self.control.lock();
        while !state.parked && !state.ended {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                state.request = Request::Run;
                self.control.changed.notify_all();
                return Err(WorkerError::Timeout {
                    name: self.name.clone(),
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            state = self
                .control
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets a paused worker go on (nothing if it runs).
    pub fn resume(&self) {
        let mut state = self.control.lock();
        if state.request == Request::Pause {
            state.request = Request::Run;
            self.control.changed.notify_all();
        }
    }

    /// Whether the worker waits in its gate now.
    pub fn is_parked(&self) -> bool {
        self.control.lock().parked
    }

    /// Stops the worker (paused or not) and waits for it.
    pub fn stop(self) {
        self.control.lock().request = Request::Stop;
        self.control.changed.notify_all();
        if let Err(err) = self.wake.write(1) {
            eprintln!("{}: cannot wake the worker to stop it: {err}", self.name);
        }
        if self.thread.join().is_err() {
            eprintln!("{}: the worker thread panicked", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A worker counting the wake-ups it served, like a device loop blocked on its eventfd.
    fn counting_worker() -> (WorkerHandle, EventFd, Arc<AtomicU64>) {
        let evt = EventFd::new(0).unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let (thread_evt, thread_served) = (evt.try_clone().unwrap(), served.clone());
        let handle = WorkerHandle::spawn("test-worker", &evt, move |gate| {
            while gate.proceed() {
                // Blocks like epoll_wait on the control eventfd.
                let n = thread_evt.read().unwrap();
                if gate.stopping() {
                    return;
                }
                thread_served.fetch_add(n, Ordering::SeqCst);
            }
        })
        .unwrap();
        (handle, evt, served)
    }

    fn wait_for(what: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !what() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_paused_worker_serves_nothing_until_resumed_and_stops_while_paused() {
        let (handle, evt, served) = counting_worker();
        evt.write(3).unwrap();
        wait_for(|| served.load(Ordering::SeqCst) == 3);
        handle.pause(Duration::from_secs(10)).unwrap();
        assert!(handle.is_parked());
        // The pause's own wake-up counted once at most; nothing is served while parked.
        let at_pause = served.load(Ordering::SeqCst);
        evt.write(5).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(served.load(Ordering::SeqCst), at_pause);
        handle.resume();
        wait_for(|| served.load(Ordering::SeqCst) == at_pause + 5);
        assert!(!handle.is_parked());
        // Pause twice, resume, pause again: all fine; then stop a paused worker.
        handle.pause(Duration::from_secs(10)).unwrap();
        handle.pause(Duration::from_secs(10)).unwrap();
        handle.resume();
        handle.resume();
        handle.pause(Duration::from_secs(10)).unwrap();
        handle.stop();
    }

    #[test]
    fn pausing_a_worker_that_ended_returns_and_a_stuck_one_times_out() {
        let evt = EventFd::new(0).unwrap();
        let ended = WorkerHandle::spawn("ended", &evt, |_gate| {}).unwrap();
        ended.pause(Duration::from_secs(10)).unwrap();
        ended.stop();

        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (busy_tx, busy_rx) = std::sync::mpsc::channel::<()>();
        let stuck = WorkerHandle::spawn("stuck", &evt, move |gate| {
            while gate.proceed() {
                // Serving a long request: does not come back to the gate in time.
                let _ = busy_tx.send(());
                let _ = release_rx.recv();
                if gate.stopping() {
                    return;
                }
            }
        })
        .unwrap();
        busy_rx.recv().unwrap();
        let err = stuck.pause(Duration::from_millis(50)).unwrap_err();
        assert!(
            err.to_string().contains("stuck worker did not pause"),
            "{err}"
        );
        release_tx.send(()).unwrap();
        drop(release_tx);
        stuck.stop();
    }
}

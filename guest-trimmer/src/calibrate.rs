//! `cpu-calibrate`: times fixed CPU loops, so that the same loops run in an emulated guest and
//! on a host give the factor by which the guest's CPU work is slower. The trim benchmark scales
//! a trim's CPU time by it to estimate the trim on hardware KVM.
//!
//! Three loops, because emulation slows kinds of work differently: arithmetic (a xorshift
//! hash), first touches of fresh anonymous pages (page faults: kernel memory management, the
//! kind of work reclaim and compaction do), and dependent loads over a buffer larger than the
//! caches (pointer chasing through the MMU).

use std::hint::black_box;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// How much work each loop does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalibrationSize {
    /// Arithmetic loop iterations.
    pub alu_iterations: u64,
    /// MiB of fresh memory touched (one write per 4 KiB page).
    pub fault_mib: usize,
    /// Dependent loads over the touched buffer.
    pub chase_loads: u64,
}

impl Default for CalibrationSize {
    /// ~0.1 s on a current x86-64 host; a few seconds in the emulated rig.
    fn default() -> Self {
        CalibrationSize {
            alu_iterations: 50_000_000,
            fault_mib: 64,
            chase_loads: 500_000,
        }
    }
}

/// The loops' times.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// What was run.
    pub size: CalibrationSize,
    /// Nanoseconds per arithmetic iteration.
    pub alu_ns_per_iter: f64,
    /// Nanoseconds per first touch of a 4 KiB page.
    pub fault_ns_per_page: f64,
    /// Nanoseconds per dependent load.
    pub chase_ns_per_load: f64,
}

/// Factors by which `slow` is slower than `fast`, per loop.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SlowdownFactors {
    /// Arithmetic.
    pub alu: f64,
    /// Page faults.
    pub fault: f64,
    /// Dependent loads.
    pub chase: f64,
}

impl SlowdownFactors {
    /// `slow` over `fast`, loop by loop.
    pub fn of(slow: &Calibration, fast: &Calibration) -> SlowdownFactors {
        let r = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        SlowdownFactors {
            alu: r(slow.alu_ns_per_iter, fast.alu_ns_per_iter),
            fault: r(slow.fault_ns_per_page, fast.fault_ns_per_page),
            chase: r(slow.chase_ns_per_load, fast.chase_ns_per_load),
        }
    }

    fn valid(&self) -> impl Iterator<Item = f64> {
        [self.alu, self.fault, self.chase]
            .into_iter()
            .filter(|f| f.is_finite() && *f > 0.0)
    }

    /// The smallest factor: scaling CPU time by it gives the largest (most conservative)
    /// hardware estimate.
    pub fn smallest(&self) -> f64 {
        self.valid().fold(f64::NAN, f64::min)
    }

    /// The largest factor: scaling CPU time by it gives the smallest hardware estimate.
    pub fn largest(&self) -> f64 {
        self.valid().fold(f64::NAN, f64::max)
    }
}

const PAGE: usize = 4096;

fn ns_per(t: Instant, n: u64) -> f64 {
    t.elapsed().as_nanos() as f64 / n.max(1) as f64
}

/// Runs the three loops once.
pub fn run(size: CalibrationSize) -> Calibration {
    // Arithmetic: xorshift64, the result kept alive through black_box.
    let t = Instant::now();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..size.alu_iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = black_box(x);
    }
    black_box(x);
    let alu = ns_per(t, size.alu_iterations);

    // First touches: a fresh zeroed allocation is untouched anonymous memory.
    let len = size.fault_mib.max(1) << 20;
    let pages = (len / PAGE) as u64;
    let t = Instant::now();
    let mut buf = vec![0u64; len / 8];
    for page in buf.chunks_mut(PAGE / 8) {
        page[0] = black_box(1);
    }
    let fault = ns_per(t, pages);

    // Dependent loads: each slot holds the index of the next, a full cycle with a large
    // odd stride so consecutive loads land on different pages.
    let n = buf.len();
    let stride = (n / 2 + 4099) | 1;
    for (i, slot) in buf.iter_mut().enumerate() {
        *slot = ((i + stride) % n) as u64;
    }
    let t = Instant::now();
    let mut at = 0usize;
    for _ in 0..size.chase_loads {
        at = black_box(buf[at]) as usize;
    }
    black_box(at);
    let chase = ns_per(t, size.chase_loads);
    Calibration {
        size,
        alu_ns_per_iter: alu,
        fault_ns_per_page: fault,
        chase_ns_per_load: chase,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loops_take_time_and_factors_compare_them() {
        let size = CalibrationSize {
            alu_iterations: 100_000,
            fault_mib: 2,
            chase_loads: 10_000,
        };
        let c = run(size);
        assert!(c.alu_ns_per_iter > 0.0, "{c:?}");
        assert!(c.fault_ns_per_page > 0.0, "{c:?}");
        assert!(c.chase_ns_per_load > 0.0, "{c:?}");
        let slow = Calibration {
            alu_ns_per_iter: c.alu_ns_per_iter * 30.0,
            fault_ns_per_page: c.fault_ns_per_page * 10.0,
            chase_ns_per_load: c.chase_ns_per_load * 20.0,
            ..c
        };
        let f = SlowdownFactors::of(&slow, &c);
        assert!((f.alu - 30.0).abs() < 1e-9 && (f.smallest() - 10.0).abs() < 1e-9);
        assert!((f.largest() - 30.0).abs() < 1e-9);
    }
}

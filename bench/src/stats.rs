//! Order statistics of samples: median, min and max.

use serde::{Deserialize, Serialize};

/// Median, min and max of a set of samples (all in the same unit).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// How many samples.
    pub n: usize,
    /// The median (mean of the two middle samples when `n` is even).
    pub median: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
}

impl Summary {
    /// Summarises `values`; `None` when there are none. NaNs are ignored (they cannot be ordered).
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            n,
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// Summarises the `Some` values of `values`.
    pub fn of_some(values: impl IntoIterator<Item = Option<f64>>) -> Option<Summary> {
        let v: Vec<f64> = values.into_iter().flatten().collect();
        Summary::of(&v)
    }
}

/// `a.median / b.median`, when both exist and `b`'s median is not zero.
pub fn median_ratio(a: Option<&Summary>, b: Option<&Summary>) -> Option<f64> {
    let (a, b) = (a?, b?);
    (b.median != 0.0).then(|| a.median / b.median)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_count_takes_the_middle() {
        let s = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!(
            s,
            Summary {
                n: 3,
                median: 3.0,
                min: 1.0,
                max: 5.0
            }
        );
    }

    #[test]
    fn even_count_averages_the_middle_two() {
        let s = Summary::of(&[4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(s.median, 3.0);
        assert_eq!((s.min, s.max, s.n), (1.0, 10.0, 4));
    }

    #[test]
    fn empty_and_nan() {
        assert!(Summary::of(&[]).is_none());
        assert!(Summary::of(&[f64::NAN]).is_none());
        let s = Summary::of(&[f64::NAN, 2.0]).unwrap();
        assert_eq!((s.n, s.median), (1, 2.0));
        let s = Summary::of_some([None, Some(1.0), Some(3.0), None]).unwrap();
        assert_eq!((s.n, s.median), (2, 2.0));
    }

    #[test]
    fn ratios() {
        let a = Summary::of(&[1.0, 2.0, 3.0]).unwrap();
        let b = Summary::of(&[4.0]).unwrap();
        assert_eq!(median_ratio(Some(&a), Some(&b)), Some(0.5));
        assert_eq!(median_ratio(Some(&a), None), None);
        let zero = Summary::of(&[0.0]).unwrap();
        assert_eq!(median_ratio(Some(&a), Some(&zero)), None);
    }
}

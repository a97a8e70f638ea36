//! Bar charts of the suite's medians (`bench-results/suite.svg`, drawn with
//! [`crate::chart`]): size on disk, save time, restore times, first request and clone RSS, one
//! bar per variant, ours and QEMU side by side.

use serde_json::Value;

use super::summary::VARIANTS;
use crate::chart::{Chart, Group};

/// Short labels for the x axis, in [`VARIANTS`] order.
fn short_label(key: &str) -> &str {
    match key {
        "raw" => "ours raw",
        "untrimmed" => "ours untrimmed",
        "default" => "ours default.json",
        "aggressive" => "ours aggressive.json",
        "qemu-plain" => "QEMU plain",
        "qemu-mapped-ram" => "QEMU mapped-ram",
        other => other,
    }
}

/// The charts of a suite summary (`summary` in suite.json): one group per variant with a
/// median, each figure scaled to its unit. Variants without a figure get no bar.
pub fn suite_charts(summary: &Value) -> Vec<Chart> {
    const MIB: f64 = 1048576.0;
    let figure = |key: &str, field: &str, scale: f64| {
        summary["variants"][key]["median"][field]
            .as_f64()
            .map(|v| v / scale)
    };
    let chart = |title: &str, unit: &str, fields: &[(&str, &str, f64)]| Chart {
        title: title.into(),
        unit: unit.into(),
        groups: VARIANTS
            .iter()
            .map(|(key, _)| Group {
                label: short_label(key).into(),
                bars: fields
                    .iter()
                    .filter_map(|&(series, field, scale)| {
                        Some((series.to_string(), figure(key, field, scale)?))
                    })
                    .collect(),
            })
            .filter(|g| !g.bars.is_empty())
            .collect(),
    };
    vec![
        chart(
            "Snapshot on disk (allocated; median)",
            "MiB",
            &[("on disk", "snapshot_alloc_bytes", MIB)],
        ),
        chart(
            "Save: pause → written (median, emulated time)",
            "ms",
            &[("snapshot", "snapshot_ms", 1.0)],
        ),
        chart(
            "Restore from process start (median, emulated time)",
            "ms",
            &[
                ("to vCPUs running", "restore_running_ms", 1.0),
                ("to first guest answer", "restore_answer_ms", 1.0),
            ],
        ),
        chart(
            "First request after restore: re-read the 32 MiB hot set (median)",
            "ms",
            &[("first request", "first_request_ms", 1.0)],
        ),
        chart(
            "Host RSS of the restored clone after its first request (median)",
            "MiB",
            &[("clone RSS", "rss_kib", 1024.0)],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn one_bar_per_variant_with_a_figure() {
        let summary = json!({"variants": {
            "default": {"median": {"snapshot_alloc_bytes": 104857600.0, "snapshot_ms": 10.0,
                "restore_running_ms": 5.0, "restore_answer_ms": 50.0, "first_request_ms": 7.0,
                "rss_kib": 2048.0}},
            "qemu-plain": {"median": {"snapshot_alloc_bytes": 209715200.0}},
            "raw": {"median": {}}
        }});
        let charts = suite_charts(&summary);
        assert_eq!(charts.len(), 5);
        let size = &charts[0];
        let labels: Vec<&str> = size.groups.iter().map(|g| g.label.as_str()).collect();
        assert_eq!(labels, ["ours default.json", "QEMU plain"]);
        assert_eq!(size.groups[0].bars, [("on disk".to_string(), 100.0)]);
        assert_eq!(size.groups[1].bars[0].1, 200.0);
        let restore = &charts[2];
        assert_eq!(restore.groups.len(), 1, "QEMU has no restore figure here");
        assert_eq!(restore.groups[0].bars.len(), 2);
        assert_eq!(charts[4].groups[0].bars[0].1, 2.0);
        let svg = crate::chart::render("suite", &charts);
        assert!(svg.contains("<svg") && svg.contains("ours default.json"));
    }
}

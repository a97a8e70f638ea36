//! Marker lines between `e2e-runner` (inside the rig) and the harness (outside).
//!
//! The runner's output reaches the harness through the rig's serial console, mixed with the
//! guests' consoles and the odd kernel message, so every marker is one line that is looked for
//! anywhere in a line. A result is printed twice: readable (`E2E-RESULT {json}`, for people) and
//! hex-encoded (`E2E-RESULT-HEX <hex of the json>`, what the harness parses), because the text
//! of a detail is arbitrary console text and the rig's `run.sh` drops every line containing
//! `reboot: Power down`.

use serde::{Deserialize, Serialize};

/// Prefix of the line announcing a scenario's start: `E2E-BEGIN <name>`.
pub const BEGIN_MARKER: &str = "E2E-BEGIN ";
/// Prefix of a scenario's result: `E2E-RESULT {json ScenarioResult}`.
pub const RESULT_MARKER: &str = "E2E-RESULT ";
/// Prefix of a scenario's hex-encoded result: `E2E-RESULT-HEX <hex of the JSON>`.
pub const RESULT_HEX_MARKER: &str = "E2E-RESULT-HEX ";
/// Prefix of the final tally: `E2E-SUMMARY {"passed":N,"failed":M}`.
pub const SUMMARY_MARKER: &str = "E2E-SUMMARY ";

/// The outcome of one scenario.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// The scenario's name (also the `#[test]` that asserts on it).
    pub name: String,
    /// Whether every check passed.
    pub passed: bool,
    /// What was measured (on success) or what went wrong (on failure).
    pub detail: String,
    /// How long the scenario took.
    pub duration_ms: u64,
}

impl ScenarioResult {
    /// The readable marker line for this result (people read it; it may not survive the rig).
    pub fn to_line(&self) -> String {
        format!("{RESULT_MARKER}{}", self.json())
    }

    /// The hex-encoded marker line for this result (what [`parse_result`] reads).
    pub fn to_hex_line(&self) -> String {
        let hex: String = self.json().bytes().map(|b| format!("{b:02x}")).collect();
        format!("{RESULT_HEX_MARKER}{hex}")
    }

    fn json(&self) -> String {
        serde_json::to_string(self).expect("a ScenarioResult serializes")
    }
}

/// Parses a result marker found anywhere in `line` (console noise before it is ignored): the
/// hex-encoded form, or else the readable one.
pub fn parse_result(line: &str) -> Option<ScenarioResult> {
    if let Some(at) = line.find(RESULT_HEX_MARKER) {
        let hex = line[at + RESULT_HEX_MARKER.len()..].trim().as_bytes();
        let pairs = hex.chunks_exact(2);
        if !pairs.remainder().is_empty() {
            return None;
        }
        let bytes = pairs
            .map(|c| u8::from_str_radix(std::str::from_utf8(c).ok()?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        return serde_json::from_slice(&bytes).ok();
    }
    let at = line.find(RESULT_MARKER)?;
    let json = line[at + RESULT_MARKER.len()..].trim();
    serde_json::from_str(json).ok()
}

/// Parses a begin marker found anywhere in `line`: the scenario's name.
pub fn parse_begin(line: &str) -> Option<&str> {
    let at = line.find(BEGIN_MARKER)?;
    let name = line[at + BEGIN_MARKER.len()..].trim();
    (!name.is_empty() && !name.contains(' ')).then_some(name)
}

/// Cuts `s` to at most `max` bytes (on a char boundary), marking the cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[{} bytes cut]", &s[..end], s.len() - end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_round_trips_through_a_noisy_line() {
        let r = ScenarioResult {
            name: "boot_1vcpu".into(),
            passed: false,
            detail: "no \"VMM-GUEST-READY\" in 180 s\nlast line: x".into(),
            duration_ms: 1234,
        };
        let line = format!("[   12.3] noise {}\r", r.to_line());
        assert_eq!(parse_result(&line).unwrap(), r);
        let hex = format!("noise {}", r.to_hex_line());
        assert!(!hex.contains("VMM-GUEST-READY"), "{hex}");
        assert_eq!(parse_result(&hex).unwrap(), r);
        assert!(parse_result("E2E-RESULT-HEX 7b0").is_none());
        assert!(parse_result("E2E-RESULT-HEX zz").is_none());
        assert!(parse_result("E2E-RESULT {broken").is_none());
        assert!(parse_result("nothing here").is_none());
    }

    #[test]
    fn begin_markers() {
        assert_eq!(parse_begin("E2E-BEGIN boot_2vcpu"), Some("boot_2vcpu"));
        assert_eq!(parse_begin("xx E2E-BEGIN a b"), None);
        assert_eq!(parse_begin("E2E-BEGIN "), None);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("abc", 5), "abc");
        let t = truncate("ééé", 3);
        assert!(t.starts_with('é') && t.contains("cut"), "{t}");
    }
}

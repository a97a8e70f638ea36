//! A small builder over `seccompiler`'s rule map: unconditional allows and per-argument rules.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// The allow-list being built: system call number → rules (empty = any arguments).
#[derive(Default)]
pub(super) struct RuleSet {
    map: BTreeMap<i64, Vec<SeccompRule>>,
    /// Calls allowed with any arguments; they win over argument rules added by other lists.
    unconditional: std::collections::BTreeSet<i64>,
}

impl RuleSet {
    /// Allows `calls` with any arguments.
    pub(super) fn allow(&mut self, calls: &[libc::c_long]) {
        for &call in calls {
            self.unconditional.insert(call);
        }
    }

    /// Allows `call` when its argument `arg` equals `value`.
    pub(super) fn allow_arg_eq(&mut self, call: libc::c_long, arg: u8, value: u64) {
        self.push(call, arg, SeccompCmpOp::Eq, value);
    }

    /// Allows `call` when `argument arg & mask == value`.
    pub(super) fn allow_arg_masked(&mut self, call: libc::c_long, arg: u8, mask: u64, value: u64) {
        self.push(call, arg, SeccompCmpOp::MaskedEq(mask), value);
    }

    fn push(&mut self, call: libc::c_long, arg: u8, op: SeccompCmpOp, value: u64) {
        let condition = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
            .expect("argument index below 6");
        let rule = SeccompRule::new(vec![condition]).expect("one condition");
        self.map.entry(call).or_default().push(rule);
    }

    /// The map `seccompiler` takes.
    pub(super) fn into_map(mut self) -> BTreeMap<i64, Vec<SeccompRule>> {
        for call in &self.unconditional {
            self.map.insert(*call, Vec::new());
        }
        self.map
    }
}

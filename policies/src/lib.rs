//! Trim policy schema, validation and the policy files users start from.

//! The trim policy parser (policies crate): any text a policy file holds. Invariant: a policy
//! that parses (and so validates) re-encodes to JSON that parses to the same policy.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policies::Policy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(policy) = Policy::from_json_str(text) {
        let json = policy.to_json_pretty();
        let again = Policy::from_json_str(&json)
            .unwrap_or_else(|e| panic!("re-encoded policy does not parse: {e}\n{json}"));
        assert_eq!(again, policy);
    }
});

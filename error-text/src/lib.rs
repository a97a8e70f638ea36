//! One-line text of an error with its chain of causes, the way every binary and log line of
//! the workspace prints errors (`outer: cause: root cause`).

/// Formats `err` and its sources as `outer: cause: cause`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as &dyn std::error::Error)
        }
    }

    #[test]
    fn causes_follow_the_error_in_order() {
        let err = Layer(
            "writing the snapshot",
            Some(Box::new(Layer(
                "writing memory.bin",
                Some(Box::new(Layer("No space left on device", None))),
            ))),
        );
        assert_eq!(
            error_chain(&err),
            "writing the snapshot: writing memory.bin: No space left on device"
        );
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }
}

use std::io::Write;

use super::*;

/// A valid policy exercising every step and hook kind; tests mutate it.
const FULL: &str = r#"{
  "name": "full",
  "description": "every field",
  "cold_age_ms": 5000,
  "hooks": [
    {"name": "runtime", "command": ["/usr/bin/runtime-ctl", "release"], "timeout_ms": 2000},
    {"name": "usr1", "signal": "SIGUSR1", "pid_file": "/run/app.pid", "ack_file": "/run/app.ack", "timeout_ms": 1000},
    {"name": "sock", "unix_socket": "/run/app.sock", "message": "trim\n", "expect_reply": "ok", "timeout_ms": 500}
  ],
  "steps": [
    {"hooks": {"names": ["runtime", "usr1"]}},
    {"hooks": {"names": ["sock"]}},
    {"damon_pageout": {"cold_age_ms": 10000, "quota_mib_per_s": 128, "spare_anon": true, "unmapped_page_cache_only": true, "max_duration_ms": 3000}},
    {"drop_caches": {"page_cache": "cold", "slab": false, "cold_age_ms": 20000}},
    {"compact_memory": {}},
    {"wait_reported": {"timeout_ms": 3000, "quiet_ms": 400}}
  ],
  "require_trim": true,
  "page_reporting_order": 5
}"#;

fn full() -> Policy {
    Policy::from_json_str(FULL).unwrap()
}

/// Validation errors of a policy, as `field: message` strings.
fn errors(policy: &Policy) -> Vec<String> {
    match policy.validate() {
        Ok(()) => Vec::new(),
        Err(e) => e.errors().iter().map(|e| e.to_string()).collect(),
    }
}

/// Parse error (with its cause) of some JSON text.
fn parse_error(text: &str) -> String {
    error_chain(&Policy::from_json_str(text).unwrap_err())
}

#[test]
fn shipped_policies_parse_and_validate() {
    for (name, text) in [
        ("default", DEFAULT_POLICY_JSON),
        ("aggressive", AGGRESSIVE_POLICY_JSON),
        ("runtime-hooks", RUNTIME_HOOKS_POLICY_JSON),
        ("s512", S512_POLICY_JSON),
        ("fast", FAST_POLICY_JSON),
    ] {
        let p = Policy::from_json_str(text).unwrap_or_else(|e| panic!("{}", error_chain(&e)));
        assert_eq!(p.name, name);
        assert_eq!(Policy::builtin(name).unwrap(), p);
        assert!(!p.description.is_empty());
        assert!(p.time_budget_ms() <= validate::MAX_TIME_BUDGET_MS);
    }
    assert!(matches!(
        Policy::builtin("nope"),
        Err(PolicyError::UnknownBuiltin { .. })
    ));
}

#[test]
fn default_policy_keeps_hot_data() {
    let p = Policy::builtin("default").unwrap();
    assert_eq!(p.cold_age_ms, 20_000);
    assert_eq!(p.budget_ms, Some(60_000));
    assert_eq!(
        p.page_reporting_order,
        Some(0),
        "pageout leaves freed memory in blocks below 2 MiB: report them all"
    );
    assert!(!p.require_trim);
    let mut kinds = Vec::new();
    for step in &p.steps {
        kinds.push(step.kind());
        match step {
            Step::DamonPageout(s) => {
                assert!(s.spare_anon);
                assert!(p.effective_cold_age_ms(s.cold_age_ms) >= 20_000);
                assert!(s.pid_files.is_empty(), "default monitors physical memory");
            }
            Step::DropCaches(_) => {
                panic!("default.json keeps what DAMON saw hot: no drop_caches (slab drops evict hot files)")
            }
            _ => {}
        }
    }
    assert_eq!(
        kinds,
        ["hooks", "damon_pageout", "compact_memory", "wait_reported"]
    );
}

#[test]
fn aggressive_policy_drops_everything_clean() {
    let p = Policy::builtin("aggressive").unwrap();
    assert_eq!(p.page_reporting_order, Some(0));
    assert!(p.steps.iter().any(|s| matches!(
        s,
        Step::DropCaches(DropCachesStep {
            page_cache: PageCacheDrop::All,
            slab: true,
            ..
        })
    )));
    assert!(p.steps.iter().any(|s| matches!(s, Step::CompactMemory(_))));
    assert!(p.steps.iter().any(|s| matches!(s, Step::WaitReported(_))));
}

#[test]
fn full_policy_parses_into_typed_values() {
    let p = full();
    assert_eq!(p.hooks.len(), 3);
    assert_eq!(
        p.hooks[0].action,
        HookAction::Command {
            argv: vec!["/usr/bin/runtime-ctl".into(), "release".into()]
        }
    );
    match &p.hooks[1].action {
        HookAction::Signal {
            signal,
            pid_file,
            ack_file,
        } => {
            assert_eq!(*signal, HookSignal::Usr1);
            assert_eq!(signal.number(), 10);
            assert_eq!(signal.name(), "SIGUSR1");
            assert_eq!(pid_file, Path::new("/run/app.pid"));
            assert_eq!(ack_file.as_deref(), Some(Path::new("/run/app.ack")));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p.hooks[2].action.kind(), "unix_socket");
    assert_eq!(p.time_budget_ms(), 2000 + 1000 + 500 + 3000 + 3000);
    let Step::DropCaches(d) = &p.steps[3] else {
        panic!()
    };
    assert_eq!(p.effective_cold_age_ms(d.cold_age_ms), 20_000);
}

#[test]
fn defaults_apply() {
    let p = Policy::from_json_str(
        r#"{"name": "d", "cold_age_ms": 1000,
            "steps": [{"damon_pageout": {}}, {"wait_reported": {"timeout_ms": 2000}}]}"#,
    )
    .unwrap();
    let Step::DamonPageout(s) = &p.steps[0] else {
        panic!()
    };
    assert_eq!(s.cold_age_ms, None);
    assert_eq!(s.quota_mib_per_s, None);
    assert!(s.spare_anon);
    assert!(!s.unmapped_page_cache_only);
    assert_eq!(s.max_duration_ms, DEFAULT_DAMON_PAGEOUT_MAX_DURATION_MS);
    let Step::WaitReported(w) = &p.steps[1] else {
        panic!()
    };
    assert_eq!(w.quiet_ms, DEFAULT_WAIT_REPORTED_QUIET_MS);
    assert!(!p.require_trim);
    assert_eq!(p.page_reporting_order, None);
    assert!(p.description.is_empty() && p.hooks.is_empty());
}

#[test]
fn json_round_trip() {
    for p in [
        full(),
        Policy::builtin("default").unwrap(),
        Policy::builtin("aggressive").unwrap(),
    ] {
        let text = p.to_json_pretty();
        assert_eq!(Policy::from_json_str(&text).unwrap(), p, "{text}");
    }
}

#[test]
fn page_cache_accepts_bools() {
    let step: DropCachesStep =
        serde_json::from_str(r#"{"page_cache": true, "slab": false}"#).unwrap();
    assert_eq!(step.page_cache, PageCacheDrop::All);
    let step: DropCachesStep =
        serde_json::from_str(r#"{"page_cache": false, "slab": true}"#).unwrap();
    assert_eq!(step.page_cache, PageCacheDrop::None);
    let err = serde_json::from_str::<DropCachesStep>(r#"{"page_cache": "some", "slab": true}"#)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(r#"expected "none", "cold", "all", true or false"#),
        "{err}"
    );
}

#[test]
fn malformed_json_names_line_and_column() {
    let err =
        Policy::from_json_str("{\n  \"name\": \"x\",\n  \"cold_age_ms\": 5,,\n}").unwrap_err();
    match &err {
        PolicyError::Parse {
            origin,
            line,
            column,
            ..
        } => {
            assert_eq!(origin, "text");
            assert_eq!(*line, 3);
            assert_eq!(*column, 20);
        }
        other => panic!("{other:?}"),
    }
    assert!(err
        .to_string()
        .starts_with("parse policy text at line 3, column 20"));
    assert!(parse_error("").contains("EOF"));
    assert!(parse_error("5").contains("invalid type: integer `5`, expected struct Policy"));
}

#[test]
fn unknown_fields_are_rejected_everywhere() {
    let cases = [
        (
            FULL.replacen("\"cold_age_ms\": 5000", "\"cold_age\": 5000", 1),
            "unknown field `cold_age`",
        ),
        (
            FULL.replacen(
                "\"timeout_ms\": 2000}",
                "\"timeout_ms\": 2000, \"shell\": true}",
                1,
            ),
            "unknown field `shell`",
        ),
        (
            FULL.replacen("\"spare_anon\": true", "\"spare_anonymous\": true", 1),
            "unknown field `spare_anonymous`",
        ),
        (
            FULL.replacen(
                "{\"compact_memory\": {}}",
                "{\"compact_memory\": {\"order\": 3}}",
                1,
            ),
            "unknown field `order`",
        ),
        (
            FULL.replacen("{\"compact_memory\": {}}", "{\"compact\": {}}", 1),
            "unknown variant `compact`",
        ),
        (
            FULL.replacen("\"quiet_ms\": 400", "\"quiet\": 400", 1),
            "unknown field `quiet`",
        ),
    ];
    for (text, expected) in cases {
        assert_ne!(text, FULL, "replacement for {expected} did not apply");
        let err = parse_error(&text);
        assert!(err.contains(expected), "{err}");
        assert!(err.contains("at line"), "{err}");
    }
}

#[test]
fn hook_shape_errors() {
    let hook = |body: &str| {
        let text = format!(
            r#"{{"name": "p", "cold_age_ms": 0, "hooks": [{body}], "steps": [{{"hooks": {{}}}}]}}"#
        );
        parse_error(&text)
    };
    let e = hook(r#"{"name": "h", "timeout_ms": 5}"#);
    assert!(
        e.contains(
            r#"hook "h": set exactly one of "command", "signal" or "unix_socket", found none"#
        ),
        "{e}"
    );
    let e =
        hook(r#"{"name": "h", "timeout_ms": 5, "command": ["/bin/true"], "signal": "SIGUSR1"}"#);
    assert!(e.contains(r#"found "command" and "signal""#), "{e}");
    let e = hook(r#"{"name": "h", "timeout_ms": 5, "signal": "SIGUSR1"}"#);
    assert!(e.contains(r#""signal" needs "pid_file""#), "{e}");
    let e = hook(r#"{"name": "h", "timeout_ms": 5, "unix_socket": "/s"}"#);
    assert!(e.contains(r#""unix_socket" needs "message""#), "{e}");
    let e = hook(r#"{"name": "h", "timeout_ms": 5, "command": ["/bin/true"], "pid_file": "/p"}"#);
    assert!(e.contains(r#""pid_file" only goes with "signal""#), "{e}");
    let e = hook(
        r#"{"name": "h", "timeout_ms": 5, "signal": "SIGUSR1", "pid_file": "/p", "message": "x"}"#,
    );
    assert!(
        e.contains(r#""message" only goes with "unix_socket""#),
        "{e}"
    );
    let e = hook(r#"{"name": "h", "timeout_ms": 5, "signal": "SIGKILL", "pid_file": "/p"}"#);
    assert!(e.contains("unknown variant `SIGKILL`"), "{e}");
    let e = hook(r#"{"name": "h", "command": ["/bin/true"]}"#);
    assert!(e.contains("missing field `timeout_ms`"), "{e}");
}

#[test]
fn out_of_range_values_name_the_field() {
    let mut p = full();
    p.cold_age_ms = MAX_COLD_AGE_MS_PLUS_ONE;
    p.page_reporting_order = Some(11);
    p.hooks[0].timeout_ms = 0;
    if let Step::DamonPageout(s) = &mut p.steps[2] {
        s.quota_mib_per_s = Some(0);
        s.max_duration_ms = 600_001;
        s.cold_age_ms = Some(MAX_COLD_AGE_MS_PLUS_ONE);
    }
    if let Step::WaitReported(s) = &mut p.steps[5] {
        s.timeout_ms = 0;
    }
    assert_eq!(
        errors(&p),
        [
            "cold_age_ms: must be between 0 and 3600000, got 3600001",
            "page_reporting_order: must be between 0 and 10, got 11",
            "hooks[0].timeout_ms: must be between 1 and 60000, got 0",
            "steps[2].damon_pageout.cold_age_ms: must be between 0 and 3600000, got 3600001",
            "steps[2].damon_pageout.quota_mib_per_s: must be between 1 and 1048576, got 0",
            "steps[2].damon_pageout.max_duration_ms: must be between 1 and 600000, got 600001",
            "steps[5].wait_reported.timeout_ms: must be between 1 and 600000, got 0",
            "steps[5].wait_reported.quiet_ms: must be between 1 and timeout_ms (0), got 400",
        ]
    );
}

const MAX_COLD_AGE_MS_PLUS_ONE: u64 = validate::MAX_COLD_AGE_MS + 1;

#[test]
fn wait_reported_timeout_error_message() {
    let text = FULL.replacen(
        "\"timeout_ms\": 3000, \"quiet_ms\": 400",
        "\"timeout_ms\": 0",
        1,
    );
    let err = Policy::from_json_str(&text).unwrap_err();
    let PolicyError::Invalid { source, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(source.has_field("steps[5].wait_reported.timeout_ms"));
    assert_eq!(
        source.errors()[0].to_string(),
        "steps[5].wait_reported.timeout_ms: must be between 1 and 600000, got 0"
    );
    assert!(
        error_chain(&err).starts_with("validate policy text: steps[5].wait_reported.timeout_ms")
    );
}

#[test]
fn names_paths_and_strings() {
    let mut p = full();
    p.name = "has space".into();
    p.hooks[1].name = "runtime".into();
    p.hooks[0].action = HookAction::Command {
        argv: vec!["runtime-ctl".into(), "a\0b".into()],
    };
    if let HookAction::UnixSocket {
        path,
        message,
        expect_reply,
    } = &mut p.hooks[2].action
    {
        *path = PathBuf::from(format!("/{}", "s".repeat(120)));
        message.clear();
        *expect_reply = Some("two\nlines".into());
    }
    assert_eq!(
        errors(&p),
        [
            r#"name: may hold only letters, digits, '.', '_' and '-', got ' ' in "has space""#,
            "hooks[0].command[0]: must be an absolute path, got \"runtime-ctl\"",
            "hooks[0].command[1]: must not contain a NUL character",
            r#"hooks[1].name: "runtime" is already the name of hooks[0]"#,
            "hooks[2].unix_socket: must be at most 107 bytes long, got 121",
            "hooks[2].message: must be 1 to 4096 bytes long, got 0",
            r#"hooks[2].expect_reply: must be a single line (no '\n')"#,
            r#"steps[0].hooks.names[1]: "usr1" is not declared in "hooks""#,
        ]
    );
}

#[test]
fn hook_references() {
    // A declared hook that no step runs, a step naming an unknown hook, an empty list.
    let mut p = full();
    p.steps[1] = Step::Hooks(HooksStep {
        names: Some(vec!["nope".into(), "runtime".into(), "runtime".into()]),
        ..HooksStep::default()
    });
    p.steps[0] = Step::Hooks(HooksStep {
        names: Some(vec![]),
        ..HooksStep::default()
    });
    assert_eq!(
        errors(&p),
        [
            "steps[0].hooks.names: must name at least one hook, or be left out to run them all",
            r#"steps[1].hooks.names[0]: "nope" is not declared in "hooks""#,
            r#"steps[1].hooks.names[2]: "runtime" is listed twice"#,
            r#"hooks[1]: "usr1" is not run by any "hooks" step nor by "after_restore""#,
            r#"hooks[2]: "sock" is not run by any "hooks" step nor by "after_restore""#,
        ]
    );
    // A hooks step with nothing declared is a valid template.
    let p = Policy::builtin("default").unwrap();
    assert!(p.hooks.is_empty() && matches!(p.steps[0], Step::Hooks(_)));
}

#[test]
fn step_rules() {
    let mut p = full();
    p.steps[3] = Step::DropCaches(DropCachesStep {
        page_cache: PageCacheDrop::None,
        slab: false,
        cold_age_ms: Some(1),
    });
    assert_eq!(
        errors(&p),
        [
            r#"steps[3].drop_caches: drops nothing: set "page_cache" to "cold" or "all", or "slab" to true"#,
            r#"steps[3].drop_caches.cold_age_ms: only applies when "page_cache" is "cold", got "page_cache": "none""#,
        ]
    );
    p.steps.clear();
    assert!(errors(&p).contains(&"steps: must have 1 to 32 entries, got 0".to_string()));
    let mut p = full();
    p.steps = vec![Step::CompactMemory(CompactMemoryStep {}); 33];
    assert!(errors(&p)
        .iter()
        .any(|e| e == "steps: must have 1 to 32 entries, got 33"));
}

#[test]
fn time_budget_is_bounded() {
    let mut p = full();
    p.steps = vec![
        Step::WaitReported(WaitReportedStep {
            timeout_ms: 600_000,
            quiet_ms: 500,
        }),
        Step::WaitReported(WaitReportedStep {
            timeout_ms: 600_000,
            quiet_ms: 500,
        }),
        Step::Hooks(HooksStep::default()),
    ];
    assert_eq!(p.time_budget_ms(), 1_203_500);
    assert_eq!(
        errors(&p),
        ["steps: hook timeouts, pageout durations and wait timeouts must add up to at most 900000 ms, got 1203500"]
    );
}

#[test]
fn load_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json");
    let err = Policy::load(&missing).unwrap_err();
    assert!(matches!(err, PolicyError::Read { .. }));
    let chain = error_chain(&err);
    assert!(
        chain.starts_with(&format!("read policy file {}: ", missing.display())),
        "{chain}"
    );

    let bad = dir.path().join("bad.json");
    let mut f = std::fs::File::create(&bad).unwrap();
    writeln!(f, "{{\n  \"name\": \"x\",\n  \"colde_age_ms\": 5\n}}").unwrap();
    let chain = error_chain(&Policy::load(&bad).unwrap_err());
    assert!(
        chain.starts_with(&format!(
            "parse policy file {} at line 3, column",
            bad.display()
        )),
        "{chain}"
    );
    assert!(chain.contains("unknown field `colde_age_ms`"), "{chain}");

    let invalid = dir.path().join("invalid.json");
    std::fs::write(
        &invalid,
        r#"{"name": "x", "cold_age_ms": 0, "steps": [{"wait_reported": {"timeout_ms": 0}}]}"#,
    )
    .unwrap();
    let chain = error_chain(&Policy::load(&invalid).unwrap_err());
    assert!(
        chain.starts_with(&format!(
            "validate policy file {}: steps[0].wait_reported.timeout_ms: must be between 1 and 600000, got 0",
            invalid.display()
        )),
        "{chain}"
    );

    let good = dir.path().join("good.json");
    std::fs::write(&good, DEFAULT_POLICY_JSON).unwrap();
    assert_eq!(
        Policy::load(&good).unwrap(),
        Policy::builtin("default").unwrap()
    );
}

#[test]
fn step_object_must_have_one_key() {
    let text = FULL.replacen(
        "{\"compact_memory\": {}}",
        "{\"compact_memory\": {}, \"drop_caches\": {\"page_cache\": \"all\", \"slab\": true}}",
        1,
    );
    let err = parse_error(&text);
    // serde reports the second key as an unexpected value, at its position.
    assert!(
        err.starts_with("parse policy text at line 15, column 25"),
        "{err}"
    );
}

#[test]
fn readme_example_is_valid() {
    let readme = include_str!("../README.md");
    let start = readme.find("```json\n").unwrap() + "```json\n".len();
    let end = start + readme[start..].find("```").unwrap();
    let p = Policy::from_json_str(&readme[start..end])
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert_eq!(p.name, "web-worker");
}

#[test]
fn runtime_hooks_policy_has_jvm_python_and_after_restore_hooks() {
    let p = Policy::builtin("runtime-hooks").unwrap();
    let names: Vec<&str> = p.hooks.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(
        names,
        ["jvm-gc", "python-gc", "python-reseed", "jvm-reconnect"]
    );
    assert!(
        matches!(&p.hooks[0].action, HookAction::Command { argv } if argv.iter().any(|a| a.contains("GC.run")))
    );
    assert!(
        matches!(&p.hooks[1].action, HookAction::UnixSocket { expect_reply: Some(r), .. } if r == "ok")
    );
    assert_eq!(p.after_restore, ["python-reseed", "jvm-reconnect"]);
    // Before-snapshot hooks only in the hooks step; after-restore hooks only after restore.
    assert_eq!(
        p.steps[0],
        Step::Hooks(HooksStep {
            names: Some(vec!["jvm-gc".into(), "python-gc".into()]),
            registered: true,
        })
    );
}

#[test]
fn trim_intervals_rules_and_defaults() {
    let mut p = full();
    assert_eq!(p.trim_intervals_us(), None);
    p.trim_aggregation_ms = Some(100);
    assert_eq!(p.trim_intervals_us(), Some((5_000, 100_000)));
    p.trim_sampling_us = Some(2_000);
    assert_eq!(p.trim_intervals_us(), Some((2_000, 100_000)));
    assert_eq!(errors(&p), Vec::<String>::new());
    p.trim_aggregation_ms = Some(1);
    assert_eq!(
        errors(&p),
        [
            "trim_aggregation_ms: must be between 10 and 10000, got 1",
            "trim_sampling_us: must be at most trim_aggregation_ms (1 ms = 1000 us), got 2000",
        ]
    );
    p.trim_aggregation_ms = None;
    p.trim_sampling_us = Some(50);
    assert_eq!(
        errors(&p),
        [
            "trim_sampling_us: must be between 100 and 1000000, got 50",
            "trim_sampling_us: needs trim_aggregation_ms (the trim's intervals are set together)",
        ]
    );
    // Round trip through JSON, units in the names.
    let text = FULL.replacen(
        "\"require_trim\"",
        "\"trim_aggregation_ms\": 50, \"trim_sampling_us\": 2500, \"require_trim\"",
        1,
    );
    let p = Policy::from_json_str(&text).unwrap();
    assert_eq!(p.trim_intervals_us(), Some((2_500, 50_000)));
    assert_eq!(Policy::from_json_str(&p.to_json_pretty()).unwrap(), p);
}

#[test]
fn budget_keep_hot_and_after_restore_rules() {
    let mut p = full();
    p.budget_ms = Some(0);
    p.keep_hot_mib = Some(MAX_KEEP_HOT_MIB_FOR_TEST + 1);
    p.after_restore = vec!["nope".into(), "sock".into(), "sock".into()];
    assert_eq!(
        errors(&p),
        [
            "budget_ms: must be between 1 and 900000, got 0",
            "keep_hot_mib: must be between 0 and 1048576, got 1048577",
            r#"after_restore[0]: "nope" is not declared in "hooks""#,
            r#"after_restore[2]: "sock" is listed twice"#,
        ]
    );
    // A hook run only after restore counts as run.
    let mut p = full();
    p.steps.remove(1);
    assert!(errors(&p).iter().any(|e| e.starts_with("hooks[2]")));
    p.after_restore = vec!["sock".into()];
    assert_eq!(errors(&p), Vec::<String>::new());
    // Units are in the names, and unknown fields are rejected with their position.
    let err =
        parse_error(&FULL.replacen("\"require_trim\"", "\"budget_s\": 3, \"require_trim\"", 1));
    assert!(err.contains("unknown field `budget_s`"), "{err}");
    assert!(
        err.starts_with("parse policy text at line 18, column 12"),
        "{err}"
    );
}

const MAX_KEEP_HOT_MIB_FOR_TEST: u64 = validate::MAX_KEEP_HOT_MIB;

#[test]
fn vaddr_pid_files() {
    let text = FULL.replacen(
        "\"max_duration_ms\": 3000}",
        "\"max_duration_ms\": 3000, \"pid_files\": [\"/run/a.pid\", \"rel.pid\"]}",
        1,
    );
    let err = parse_error(&text);
    assert!(
        err.ends_with(
            "steps[2].damon_pageout.pid_files[1]: must be an absolute path, got \"rel.pid\""
        ),
        "{err}"
    );
    let p = Policy::from_json_str(&text.replace("\"rel.pid\"", "\"/run/b.pid\"")).unwrap();
    let Step::DamonPageout(s) = &p.steps[2] else {
        panic!("step 2 is {:?}", p.steps[2]);
    };
    assert_eq!(
        s.pid_files,
        [PathBuf::from("/run/a.pid"), PathBuf::from("/run/b.pid")]
    );
}

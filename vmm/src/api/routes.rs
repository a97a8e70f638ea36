//! Routing: one entry per `(method, path pattern)` in [`ROUTES`], each with a small parser that
//! turns the HTTP request into a typed [`ApiRequest`].
//!
//! Adding a resource is one table row plus one parser, e.g. for later: `PUT /snapshot/create`,
//! `PUT /drives/{id}` (the `{id}` segment is passed to the parser in `captures`).

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::http::{Method, Request, Response};
use super::{
    ApiError, ApiReply, ApiRequest, BalloonRequest, DriveRequest, VmStateRequest, VsockRequest,
};

/// Turns a request (and the path segments matched by `{...}` in its pattern) into an
/// [`ApiRequest`].
type ParseFn = fn(&Request, &[&str]) -> Result<ApiRequest, ApiError>;

/// One row of the routing table.
struct Route {
    method: Method,
    /// `/`-separated segments; a `{name}` segment matches any one non-empty segment.
    pattern: &'static str,
    parse: ParseFn,
}

/// The routing table.
const ROUTES: &[Route] = &[
    Route {
        method: Method::Get,
        pattern: "/drives",
        parse: |r, _| expect_no_body(r).map(|()| ApiRequest::Drive(DriveRequest::List)),
    },
    Route {
        method: Method::Get,
        pattern: "/drives/{id}",
        parse: |r, c| expect_no_body(r).map(|()| ApiRequest::Drive(DriveRequest::Get(c[0].into()))),
    },
    Route {
        method: Method::Put,
        pattern: "/drives/{id}",
        parse: |_, c| Ok(ApiRequest::Drive(DriveRequest::Configure(c[0].into()))),
    },
    Route {
        method: Method::Patch,
        pattern: "/drives/{id}",
        parse: |_, c| Ok(ApiRequest::Drive(DriveRequest::Update(c[0].into()))),
    },
    Route {
        method: Method::Get,
        pattern: "/",
        parse: get_vm_info,
    },
    Route {
        method: Method::Patch,
        pattern: "/vm",
        parse: patch_vm,
    },
    Route {
        method: Method::Put,
        pattern: "/actions",
        parse: put_actions,
    },
    Route {
        method: Method::Put,
        pattern: "/balloon",
        parse: put_balloon,
    },
    Route {
        method: Method::Put,
        pattern: "/vsock",
        parse: |request, _| {
            Ok(ApiRequest::Vsock(VsockRequest::Configure(parse_body(
                request,
            )?)))
        },
    },
    Route {
        method: Method::Get,
        pattern: "/vsock",
        parse: |request, _| {
            expect_no_body(request)?;
            Ok(ApiRequest::Vsock(VsockRequest::Get))
        },
    },
    Route {
        method: Method::Patch,
        pattern: "/balloon",
        parse: patch_balloon,
    },
    Route {
        method: Method::Get,
        pattern: "/balloon",
        parse: get_balloon,
    },
    Route {
        method: Method::Get,
        pattern: "/balloon/statistics",
        parse: get_balloon_statistics,
    },
    Route {
        method: Method::Patch,
        pattern: "/balloon/statistics",
        parse: patch_balloon_statistics,
    },
    Route {
        method: Method::Put,
        pattern: "/balloon/hinting/start",
        parse: put_balloon_hinting_start,
    },
    Route {
        method: Method::Get,
        pattern: "/balloon/hinting/status",
        parse: get_balloon_hinting_status,
    },
    Route {
        method: Method::Put,
        pattern: "/balloon/hinting/stop",
        parse: put_balloon_hinting_stop,
    },
    Route {
        method: Method::Put,
        pattern: "/snapshot/create",
        parse: put_snapshot_create,
    },
    Route {
        method: Method::Put,
        pattern: "/snapshot/load",
        parse: put_snapshot_load,
    },
];

/// The actions `PUT /actions` accepts.
const ALLOWED_ACTIONS: &[&str] = &["Shutdown"];
/// Firecracker actions this VMM knows of but does not implement.
const UNSUPPORTED_ACTIONS: &[&str] = &["SendCtrlAltDel", "FlushMetrics", "InstanceStart"];

/// Maps a request to a typed [`ApiRequest`]: `404` for an unknown path, `405` for a known path
/// with another method, `400` for a bad body.
pub fn route(request: &Request) -> Result<ApiRequest, ApiError> {
    let segments = segments(&request.path);
    let mut path_known = false;
    for route in ROUTES {
        if let Some(captures) = match_pattern(route.pattern, &segments) {
            if route.method == request.method {
                return (route.parse)(request, &captures);
            }
            path_known = true;
        }
    }
    if path_known {
        let allowed = allowed_methods(&request.path).join(", ");
        Err(ApiError::MethodNotAllowed(format!(
            "method {} is not allowed on {}; allowed: {allowed}",
            request.method, request.path
        )))
    } else {
        Err(ApiError::NotFound(format!(
            "no resource at {}",
            truncate(&request.path)
        )))
    }
}

/// The methods the table allows on `path` (empty for an unknown path), for the `Allow` header.
pub fn allowed_methods(path: &str) -> Vec<&'static str> {
    let segments = segments(path);
    let mut methods: Vec<&'static str> = ROUTES
        .iter()
        .filter(|route| match_pattern(route.pattern, &segments).is_some())
        .map(|route| route.method.as_str())
        .collect();
    methods.dedup();
    methods
}

/// Routes `request`, passes the result to `handle`, and renders the outcome as a response.
pub fn respond(
    request: &Request,
    handle: impl FnOnce(ApiRequest) -> Result<ApiReply, ApiError>,
) -> Response {
    match route(request).and_then(handle) {
        Ok(ApiReply::Empty) => Response::no_content(),
        Ok(ApiReply::Json(value)) => Response::json(200, &value),
        Err(err) => {
            let mut response = Response::fault(err.status(), &err.to_string());
            if let ApiError::MethodNotAllowed(_) = err {
                response
                    .headers
                    .push(("Allow", allowed_methods(&request.path).join(", ")));
            }
            response
        }
    }
}

/// Parses a JSON request body into `T` (whose serde derive should `deny_unknown_fields`).
/// Serde's message, which names the offending field or value, becomes the `400`'s message.
pub fn parse_body<T: DeserializeOwned>(request: &Request) -> Result<T, ApiError> {
    if request.body.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "{} {} needs a JSON request body",
            request.method, request.path
        )));
    }
    serde_json::from_slice(&request.body)
        .map_err(|err| ApiError::BadRequest(format!("invalid request body: {err}")))
}

/// Rejects a body on a request that takes none.
fn expect_no_body(request: &Request) -> Result<(), ApiError> {
    if request.body.is_empty() {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{} {} takes no request body",
            request.method, request.path
        )))
    }
}

/// `GET /`
fn get_vm_info(request: &Request, _: &[&str]) -> Result<ApiRequest, ApiError> {
    expect_no_body(request)?;
    Ok(ApiRequest::GetVmInfo)
}

/// Body of `PATCH /vm`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: VmStateRequest,
}

/// `PATCH /vm {"state": "Paused" | "Resumed"}`
fn patch_vm(request: &Request, _: &[&str]) -> Result<ApiRequest, ApiError> {
    let body: VmStateBody = parse_body(request)?;
    Ok(ApiRequest::SetVmState(body.state))
}

/// Body of `PUT /actions`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: String,
}

/// `PUT /actions {"action_type": "Shutdown"}`
fn put_actions(request: &Request, _: &[&str]) -> Result<ApiRequest, ApiError> {
    let body: ActionBody = parse_body(request)?;
    let allowed = ALLOWED_ACTIONS.join("`, `");
    match body.action_type.as_str() {
        "Shutdown" => Ok(ApiRequest::Shutdown),
        other if UNSUPPORTED_ACTIONS.contains(&other) => Err(ApiError::BadRequest(format!(
            "action_type `{other}` is not supported; allowed values: `{allowed}`"
        ))),
        other => Err(ApiError::BadRequest(format!(
            "unknown action_type {}; allowed values: `{allowed}`",
            truncate(other)
        ))),
    }
}

/// `PUT /balloon` with a full balloon configuration (unknown fields rejected).
fn put_balloon(request: &Request, _: &[&str]) -> Result<ApiRequest, ApiError> {
    Ok(ApiRequest::Balloon(BalloonRequest::Configure(parse_body(
        request,
    )?)))
}

/// Body of `PATCH /balloon`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BalloonUpdateBody {
    amount_mib: u32,
}

/// `PATCH /balloon {"amount_mib": N}`
fn patch_balloon(request: &Request, _: &[&str]) -> Result<ApiRequest, ApiError> {
    let body: BalloonUpdateBody = parse_body(request)?;
    Ok(ApiRequest::Balloon(BalloonRequest::SetTarget {
        amount_mib: body.amount_mib,
    }))
}

/// `GET /balloon`
fn get_balloon(request: &Request, _: &[&str]) -> Result<ApiRequest, ApiError> {
    expect_no_body(request)?;
    Ok(ApiRequest::Balloon(BalloonRequest::Get))
}

/// `GET /balloon/statistics`
fn get_balloon_statistics(request: &Request, _: &[&str]) -> Result<ApiRequest, ApiError> {
    expect_no_body(request)?;
    Ok(ApiRequest::Balloon(BalloonRequest::GetStatistics))
}

/// Body of `PATCH /balloon/statistics`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BalloonStatsUpdateBody {
    stats_polling_interval_s: u16,
}

/// `PATCH /balloon/statistics {"stats_polling_interval_s": N}`
fn patch_balloon_statistics(request: &Request, _: &[&str]) -> Result<ApiRequest, ApiError> {
    let body: BalloonStatsUpdateBody = parse_body(request)?;
    Ok(ApiRequest::Balloon(BalloonRequest::SetStatisticsInterval {
        stats_polling_interval_s: body.stats_polling_interval_s,
    }))
}

/// `PUT /balloon/hinting/start [{"acknowledge_on_stop": bool}]` (no body: the defaults)
fn put_balloon_hinting_start(request: &Request, _: &[&str]) -> Result<ApiRequest, ApiError> {
    let options = if request.body.iter().all(u8::is_ascii_whitespace) {
        balloon::HintingOptions::default()
    } else {
        parse_body(request)?
    };
    Ok(ApiRequest::Balloon(BalloonRequest::StartHinting(options)))
}

/// `GET /balloon/hinting/status`
fn get_balloon_hinting_status(request: &Request, _: &[&str]) -> Result<ApiRequest, ApiError> {
    expect_no_body(request)?;
    Ok(ApiRequest::Balloon(BalloonRequest::GetHintingStatus))
}

/// `PUT /balloon/hinting/stop` (no body, or an empty JSON object)
fn put_balloon_hinting_stop(request: &Request, _: &[&str]) -> Result<ApiRequest, ApiError> {
    expect_empty_object(request)?;
    Ok(ApiRequest::Balloon(BalloonRequest::StopHinting))
}

/// Body of `PUT /snapshot/create` (Firecracker's shape; the snapshot is a directory).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotCreateBody {
    /// The snapshot directory.
    snapshot_path: std::path::PathBuf,
    /// Only `"Full"` (the default).
    #[serde(default)]
    snapshot_type: Option<String>,
    /// What the VM does afterwards: `resume` (default), `pause` or `stop`.
    #[serde(default)]
    after: crate::snapshot::AfterSnapshot,
    /// `true`: store every page (a raw full dump, for comparison); default compact.
    #[serde(default)]
    raw_memory: bool,
    /// Trim the guest and run a hinting pass first (see [`crate::pipeline`]).
    #[serde(default)]
    pipeline: Option<crate::pipeline::PipelineRequest>,
    /// Write a diff layer on this snapshot directory (the VM's lineage) instead of a full one.
    #[serde(default)]
    parent: Option<std::path::PathBuf>,
}

/// `PUT /snapshot/create {"snapshot_path": DIR[, "snapshot_type": "Full"][, "after": "resume"|"pause"|"stop"]}`
fn put_snapshot_create(request: &Request, _: &[&str]) -> Result<ApiRequest, ApiError> {
    let body: SnapshotCreateBody = parse_body(request)?;
    if let Some(kind) = body.snapshot_type.as_deref().filter(|k| *k != "Full") {
        return Err(ApiError::BadRequest(format!(
            "snapshot_type {} is not supported; allowed values: `Full`",
            truncate(kind)
        )));
    }
    if body.snapshot_path.as_os_str().is_empty() {
        return Err(ApiError::BadRequest("snapshot_path is empty".into()));
    }
    let snapshot = crate::snapshot::SnapshotRequest {
        path: body.snapshot_path,
        after: body.after,
        raw_memory: body.raw_memory,
        parent: body.parent,
    };
    Ok(match body.pipeline {
        Some(pipeline) => ApiRequest::SnapshotPipeline(pipeline, snapshot),
        None => ApiRequest::CreateSnapshot(snapshot),
    })
}

/// `PUT /snapshot/load` (see [`super::load`]).
fn put_snapshot_load(request: &Request, _: &[&str]) -> Result<ApiRequest, ApiError> {
    super::load::parse(request)
}

/// An empty body, or `{}` (what some clients send with every `PUT`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyBody {}

/// Accepts no body or an empty JSON object.
fn expect_empty_object(request: &Request) -> Result<(), ApiError> {
    if request.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    parse_body::<EmptyBody>(request).map(|_| ())
}

/// The non-empty segments of a path: `/`, `//` → `[]`; `/vm/` → `["vm"]`.
fn segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

/// Matches path segments against a pattern, returning the `{...}` captures.
fn match_pattern<'a>(pattern: &str, segments: &[&'a str]) -> Option<Vec<&'a str>> {
    let pattern: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
    if pattern.len() != segments.len() {
        return None;
    }
    let mut captures = Vec::new();
    for (want, have) in pattern.iter().zip(segments) {
        if want.starts_with('{') && want.ends_with('}') {
            captures.push(*have);
        } else if want != have {
            return None;
        }
    }
    Some(captures)
}

/// Quotes client input for an error message, cut to a sane length.
fn truncate(s: &str) -> String {
    const MAX_CHARS: usize = 128;
    let mut out: String = s.chars().take(MAX_CHARS).collect();
    if s.chars().nth(MAX_CHARS).is_some() {
        out.push('…');
    }
    format!("`{out}`")
}

#[cfg(test)]
mod tests {
    use super::super::http::{parse_request, ParsedRequest, Version};
    use super::*;

    fn request(method: Method, path: &str, body: &str) -> Request {
        Request {
            method,
            path: path.to_string(),
            query: None,
            version: Version::Http11,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            keep_alive: true,
        }
    }

    fn bad_request_message(result: Result<ApiRequest, ApiError>) -> String {
        match result {
            Err(ApiError::BadRequest(message)) => message,
            other => panic!("expected 400, got {other:?}"),
        }
    }

    #[test]
    fn every_route() {
        assert_eq!(
            route(&request(Method::Get, "/", "")),
            Ok(ApiRequest::GetVmInfo)
        );
        assert_eq!(
            route(&request(Method::Patch, "/vm", r#"{"state":"Paused"}"#)),
            Ok(ApiRequest::SetVmState(VmStateRequest::Paused))
        );
        assert_eq!(
            route(&request(
                Method::Patch,
                "/vm/",
                r#"{ "state" : "Resumed" }"#
            )),
            Ok(ApiRequest::SetVmState(VmStateRequest::Resumed))
        );
        assert_eq!(
            route(&request(
                Method::Put,
                "/actions",
                r#"{"action_type":"Shutdown"}"#
            )),
            Ok(ApiRequest::Shutdown)
        );
    }

    #[test]
    fn drive_routes() {
        for (method, path, expected) in [
            (Method::Get, "/drives", DriveRequest::List),
            (
                Method::Get,
                "/drives/data",
                DriveRequest::Get("data".into()),
            ),
            (
                Method::Put,
                "/drives/new",
                DriveRequest::Configure("new".into()),
            ),
            (
                Method::Patch,
                "/drives/data",
                DriveRequest::Update("data".into()),
            ),
        ] {
            assert_eq!(
                route(&request(method, path, "")).unwrap(),
                ApiRequest::Drive(expected),
                "{path}"
            );
        }
    }

    #[test]
    fn vsock_routes() {
        assert_eq!(
            route(&request(Method::Get, "/vsock", "")),
            Ok(ApiRequest::Vsock(VsockRequest::Get))
        );
        let body = r#"{"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "/tmp/v.sock"}"#;
        assert!(matches!(
            route(&request(Method::Put, "/vsock", body)),
            Ok(ApiRequest::Vsock(VsockRequest::Configure(c))) if c.guest_cid == 3
        ));
        assert!(route(&request(Method::Put, "/vsock", r#"{"cid": 3}"#)).is_err());
    }

    #[test]
    fn balloon_routes() {
        let config = balloon::BalloonConfig {
            amount_mib: 8,
            deflate_on_oom: true,
            stats_polling_interval_s: 1,
            free_page_reporting: false,
            free_page_hinting: true,
        };
        let body = serde_json::to_string(&config).unwrap();
        for (method, path, body, expected) in [
            (
                Method::Put,
                "/balloon",
                body.as_str(),
                BalloonRequest::Configure(config.clone()),
            ),
            (
                Method::Patch,
                "/balloon",
                r#"{"amount_mib": 100}"#,
                BalloonRequest::SetTarget { amount_mib: 100 },
            ),
            (Method::Get, "/balloon", "", BalloonRequest::Get),
            (
                Method::Get,
                "/balloon/statistics",
                "",
                BalloonRequest::GetStatistics,
            ),
            (
                Method::Patch,
                "/balloon/statistics",
                r#"{"stats_polling_interval_s": 5}"#,
                BalloonRequest::SetStatisticsInterval {
                    stats_polling_interval_s: 5,
                },
            ),
            (
                Method::Put,
                "/balloon/hinting/start",
                "",
                BalloonRequest::StartHinting(balloon::HintingOptions::default()),
            ),
            (
                Method::Put,
                "/balloon/hinting/start",
                r#"{"acknowledge_on_stop": false}"#,
                BalloonRequest::StartHinting(balloon::HintingOptions {
                    acknowledge_on_stop: false,
                }),
            ),
            (
                Method::Put,
                "/balloon/hinting/start",
                "{}",
                BalloonRequest::StartHinting(balloon::HintingOptions::default()),
            ),
            (
                Method::Get,
                "/balloon/hinting/status",
                "",
                BalloonRequest::GetHintingStatus,
            ),
            (
                Method::Put,
                "/balloon/hinting/stop",
                " ",
                BalloonRequest::StopHinting,
            ),
        ] {
            assert_eq!(
                route(&request(method, path, body)),
                Ok(ApiRequest::Balloon(expected)),
                "{method} {path} {body}"
            );
        }
        assert_eq!(allowed_methods("/balloon"), ["PUT", "PATCH", "GET"]);
        for (method, path, body, needle) in [
            (
                Method::Patch,
                "/balloon",
                r#"{"amount_mib": -1}"#,
                "invalid value",
            ),
            (
                Method::Patch,
                "/balloon",
                r#"{"amount_mib": 1, "x": 2}"#,
                "unknown field `x`",
            ),
            (Method::Patch, "/balloon", "", "needs a JSON request body"),
            (
                Method::Put,
                "/balloon",
                r#"{"amount_mib": 1}"#,
                "deflate_on_oom",
            ),
            (
                Method::Patch,
                "/balloon/statistics",
                r#"{"stats_polling_interval_s": 70000}"#,
                "invalid value",
            ),
            (
                Method::Put,
                "/balloon/hinting/start",
                r#"{"now": true}"#,
                "unknown field `now`",
            ),
            (
                Method::Get,
                "/balloon/statistics",
                "{}",
                "takes no request body",
            ),
        ] {
            let message = bad_request_message(route(&request(method, path, body)));
            assert!(message.contains(needle), "{method} {path}: {message}");
        }
        for (method, path) in [
            (Method::Delete, "/balloon"),
            (Method::Put, "/balloon/statistics"),
            (Method::Get, "/balloon/hinting/start"),
            (Method::Put, "/balloon/hinting/status"),
        ] {
            assert!(
                matches!(
                    route(&request(method, path, "")),
                    Err(ApiError::MethodNotAllowed(_))
                ),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn from_raw_bytes() {
        let raw = b"PATCH /vm HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"state\":\"Resumed\"}";
        let Ok(ParsedRequest::Complete { request, .. }) = parse_request(raw) else {
            panic!("request did not parse");
        };
        assert_eq!(
            route(&request),
            Ok(ApiRequest::SetVmState(VmStateRequest::Resumed))
        );
    }

    #[test]
    fn unknown_paths_are_404() {
        for path in [
            "/vms",
            "/vm/extra",
            "/actions/x",
            "/balloons",
            "/balloon/x",
            "/%2F",
        ] {
            for method in [Method::Get, Method::Put, Method::Patch] {
                let result = route(&request(method, path, "{}"));
                assert!(
                    matches!(result, Err(ApiError::NotFound(_))),
                    "{method} {path}: {result:?}"
                );
            }
        }
    }

    #[test]
    fn wrong_methods_are_405() {
        for (method, path) in [
            (Method::Put, "/"),
            (Method::Patch, "/"),
            (Method::Get, "/vm"),
            (Method::Put, "/vm"),
            (Method::Get, "/actions"),
            (Method::Patch, "/actions"),
            (Method::Delete, "/vm"),
            (Method::Head, "/"),
        ] {
            let result = route(&request(method, path, ""));
            let Err(err @ ApiError::MethodNotAllowed(_)) = result else {
                panic!("{method} {path}: {result:?}");
            };
            assert_eq!(err.status(), 405);
        }
        assert_eq!(allowed_methods("/vm"), ["PATCH"]);
        let response = respond(&request(Method::Get, "/vm", ""), |_| {
            unreachable!("not routed")
        });
        assert_eq!(response.status, 405);
        assert!(response.headers.contains(&("Allow", "PATCH".to_string())));
    }

    #[test]
    fn unknown_field_names_the_field() {
        let message = bad_request_message(route(&request(
            Method::Patch,
            "/vm",
            r#"{"state":"Paused","vcpus":2}"#,
        )));
        assert!(message.contains("unknown field `vcpus`"), "{message}");
        let message = bad_request_message(route(&request(
            Method::Put,
            "/actions",
            r#"{"action_type":"Shutdown","force":true}"#,
        )));
        assert!(message.contains("unknown field `force`"), "{message}");
    }

    #[test]
    fn bad_bodies_are_400() {
        for body in [
            "",
            "{",
            "null",
            "[]",
            r#"{}"#,
            r#"{"state":"Running"}"#,
            r#"{"state":1}"#,
            "\u{fffd}",
        ] {
            let message = bad_request_message(route(&request(Method::Patch, "/vm", body)));
            assert!(!message.is_empty());
        }
        let message = bad_request_message(route(&request(
            Method::Patch,
            "/vm",
            "{\"state\":\"Hopping\"}",
        )));
        assert!(
            message.contains("`Paused`") && message.contains("`Resumed`"),
            "{message}"
        );
        let mut non_utf8 = request(Method::Patch, "/vm", "");
        non_utf8.body = b"{\"state\":\"\xff\"}".to_vec();
        bad_request_message(route(&non_utf8));
        bad_request_message(route(&request(Method::Get, "/", "{}")));
    }

    #[test]
    fn only_shutdown_action_is_accepted() {
        for action in ["SendCtrlAltDel", "FlushMetrics", "Reboot", "shutdown"] {
            let body = format!(r#"{{"action_type":"{action}"}}"#);
            let message = bad_request_message(route(&request(Method::Put, "/actions", &body)));
            assert!(message.contains(action), "{message}");
            assert!(message.contains("allowed values: `Shutdown`"), "{message}");
        }
    }

    #[test]
    fn respond_maps_replies_and_errors() {
        let get = request(Method::Get, "/", "");
        let ok = respond(&get, |_| {
            Ok(ApiReply::Json(serde_json::json!({"state": "Running"})))
        });
        assert_eq!(ok.status, 200);
        assert_eq!(ok.body, br#"{"state":"Running"}"#);
        assert_eq!(respond(&get, |_| Ok(ApiReply::Empty)).status, 204);
        for (err, status) in [
            (ApiError::BadRequest("b".into()), 400),
            (ApiError::NotFound("n".into()), 404),
            (ApiError::MethodNotAllowed("m".into()), 405),
            (ApiError::Conflict("c".into()), 409),
            (ApiError::Internal("i".into()), 500),
        ] {
            let message = err.to_string();
            let response = respond(&get, |_| Err(err));
            assert_eq!(response.status, status);
            let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
            assert_eq!(body, serde_json::json!({ "fault_message": message }));
        }
    }

    #[test]
    fn pattern_captures() {
        assert_eq!(
            match_pattern("/drives/{id}", &segments("/drives/rootfs")),
            Some(vec!["rootfs"])
        );
        assert_eq!(match_pattern("/drives/{id}", &segments("/drives")), None);
        assert_eq!(match_pattern("/", &segments("//")), Some(vec![]));
    }
}

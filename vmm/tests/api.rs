//! End-to-end tests of the control API: a real server on a temporary socket, a fake VMM
//! behind [`ApiHandler`], driven by the client, by the CLI functions and by raw bytes.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use vmm::api::client::{self, ApiResponse, ClientError};
use vmm::api::{
    ApiError, ApiHandler, ApiReply, ApiRequest, ApiServer, ApiServerError, ApiServerHandle, VmInfo,
    VmStateRequest,
};
use vmm::cli::control;

/// A fake VMM: not booted until `boot`, then running or paused.
#[derive(Default)]
struct FakeVmm {
    state: Mutex<FakeState>,
    shutdown_tx: Mutex<Option<mpsc::Sender<()>>>,
}

#[derive(Default)]
struct FakeState {
    booted: bool,
    paused: bool,
    requests: Vec<ApiRequest>,
}

impl FakeVmm {
    fn booted() -> Arc<FakeVmm> {
        let vmm = FakeVmm::default();
        vmm.state.lock().unwrap().booted = true;
        Arc::new(vmm)
    }

    fn requests(&self) -> Vec<ApiRequest> {
        self.state.lock().unwrap().requests.clone()
    }
}

impl ApiHandler for FakeVmm {
    fn handle(&self, request: ApiRequest) -> Result<ApiReply, ApiError> {
        let mut state = self.state.lock().unwrap();
        state.requests.push(request.clone());
        match request {
            ApiRequest::GetVmInfo => {
                let info = VmInfo {
                    state: match (state.booted, state.paused) {
                        (false, _) => "NotStarted",
                        (true, false) => "Running",
                        (true, true) => "Paused",
                    }
                    .into(),
                    uptime_ms: 1500,
                    vcpu_count: 2,
                    mem_size_mib: 128,
                };
                Ok(ApiReply::Json(serde_json::to_value(info).unwrap()))
            }
            ApiRequest::SetVmState(_) if !state.booted => Err(ApiError::Conflict(
                "the microVM has not been started".into(),
            )),
            ApiRequest::SetVmState(target) => {
                state.paused = target == VmStateRequest::Paused;
                Ok(ApiReply::Empty)
            }
            ApiRequest::Shutdown => {
                if let Some(tx) = self.shutdown_tx.lock().unwrap().take() {
                    let _ = tx.send(());
                }
                Ok(ApiReply::Empty)
            }
            ApiRequest::Balloon(_) => Err(ApiError::Conflict("the fake VMM has no balloon".into())),
            ApiRequest::CreateSnapshot(_)
            | ApiRequest::SnapshotPipeline(..)
            | ApiRequest::LoadSnapshot(_) => {
                Err(ApiError::Conflict("the fake VMM has no snapshots".into()))
            }
            ApiRequest::Drive(request) => vmm::api::drives::handle(&[], request),
            ApiRequest::Vsock(_) => Err(ApiError::Conflict("the fake VMM has no vsock".into())),
        }
    }
}

fn serve(path: &Path, vmm: &Arc<FakeVmm>) -> ApiServerHandle {
    let handler: Arc<dyn ApiHandler> = vmm.clone();
    ApiServer::bind(path).unwrap().spawn(handler).unwrap()
}

fn call(socket: &Path, method: &str, path: &str, body: Option<Value>) -> ApiResponse {
    client::request(socket, method, path, body.as_ref()).unwrap()
}

fn fault(response: &ApiResponse) -> String {
    response
        .fault_message()
        .unwrap_or_else(|| panic!("no fault_message in {response:?}"))
        .to_string()
}

/// Writes raw bytes and reads until the server closes the connection.
fn raw_exchange(socket: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            // A server closing with some of our bytes unread resets the connection after its
            // response has been delivered.
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(err) => panic!("reading the response: {err}"),
        }
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn client_drives_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let vmm = FakeVmm::booted();
    let _server = serve(&sock, &vmm);

    let info = call(&sock, "GET", "/", None);
    assert_eq!(info.status, 200);
    let body = info.body.unwrap();
    assert_eq!(body["state"], "Running");
    assert_eq!(body["vcpu_count"], 2);

    let paused = call(&sock, "PATCH", "/vm", Some(json!({"state": "Paused"})));
    assert_eq!((paused.status, paused.body), (204, None));
    assert_eq!(
        call(&sock, "GET", "/", None).body.unwrap()["state"],
        "Paused"
    );
    // Idempotent.
    assert_eq!(
        call(&sock, "PATCH", "/vm", Some(json!({"state": "Paused"}))).status,
        204
    );
    let resumed = call(&sock, "PATCH", "/vm", Some(json!({"state": "Resumed"})));
    assert_eq!(resumed.status, 204);
    let shutdown = call(
        &sock,
        "PUT",
        "/actions",
        Some(json!({"action_type": "Shutdown"})),
    );
    assert_eq!(shutdown.status, 204);

    assert_eq!(
        vmm.requests(),
        [
            ApiRequest::GetVmInfo,
            ApiRequest::SetVmState(VmStateRequest::Paused),
            ApiRequest::GetVmInfo,
            ApiRequest::SetVmState(VmStateRequest::Paused),
            ApiRequest::SetVmState(VmStateRequest::Resumed),
            ApiRequest::Shutdown,
        ]
    );
}

#[test]
fn errors_are_json_faults_with_4xx_codes() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let vmm = Arc::new(FakeVmm::default()); // Not booted.
    let _server = serve(&sock, &vmm);

    let unknown_field = call(
        &sock,
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused", "turbo": true})),
    );
    assert_eq!(unknown_field.status, 400);
    assert!(fault(&unknown_field).contains("unknown field `turbo`"));

    let bad_value = call(&sock, "PATCH", "/vm", Some(json!({"state": "Asleep"})));
    assert_eq!(bad_value.status, 400);
    assert!(fault(&bad_value).contains("Asleep"));

    let missing_body = call(&sock, "PATCH", "/vm", None);
    assert_eq!(missing_body.status, 400);

    let action = call(
        &sock,
        "PUT",
        "/actions",
        Some(json!({"action_type": "SendCtrlAltDel"})),
    );
    assert_eq!(action.status, 400);
    assert!(fault(&action).contains("`Shutdown`"));

    let not_found = call(&sock, "GET", "/machine-config", None);
    assert_eq!(not_found.status, 404);
    assert!(fault(&not_found).contains("/machine-config"));

    let wrong_method = call(&sock, "GET", "/vm", None);
    assert_eq!(wrong_method.status, 405);
    assert!(fault(&wrong_method).contains("PATCH"));

    let conflict = call(&sock, "PATCH", "/vm", Some(json!({"state": "Resumed"})));
    assert_eq!(conflict.status, 409);
    assert_eq!(fault(&conflict), "the microVM has not been started");

    // Only routed, valid requests reach the VMM.
    assert_eq!(
        vmm.requests(),
        [ApiRequest::SetVmState(VmStateRequest::Resumed)]
    );
}

#[test]
fn raw_http_keep_alive_pipelining_and_close() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let vmm = FakeVmm::booted();
    let _server = serve(&sock, &vmm);

    // Two pipelined requests in one write; the second closes the connection.
    let text = raw_exchange(
        &sock,
        b"PATCH /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}\
          GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"), "{text}");
    let second = text.find("HTTP/1.1 200 OK\r\n").expect(&text);
    assert!(text[second..].contains("Connection: close\r\n"), "{text}");
    let body = &text[text.find("\r\n\r\n{").expect(&text) + 4..];
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["state"], "Paused");

    // A request split across writes, on a connection kept alive between requests.
    let mut stream = UnixStream::connect(&sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for part in [&b"GET / HT"[..], b"TP/1.1\r\n", b"Host: x\r\n\r\n"] {
        stream.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
    assert!(!first.contains("Connection: close"), "{first}");
    // Same connection, next request.
    stream
        .write_all(b"PATCH /vm HTTP/1.1\r\nContent-Length: 19\r\nConnection: close\r\n\r\n{\"state\":\"Resumed\"}")
        .unwrap();
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert!(rest.starts_with("HTTP/1.1 204 No Content\r\n"), "{rest}");
}

#[test]
fn raw_http_protocol_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let vmm = FakeVmm::booted();
    let _server = serve(&sock, &vmm);

    let cases: &[(&[u8], &str)] = &[
        (b"hello\r\n\r\n", "400 Bad Request"),
        (
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            "400 Bad Request",
        ),
        (b"GET /\xff HTTP/1.1\r\n\r\n", "400 Bad Request"),
        (b"GET / HTTP/3.0\r\n\r\n", "505 HTTP Version Not Supported"),
        (b"BREW / HTTP/1.1\r\n\r\n", "501 Not Implemented"),
        (
            b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "501 Not Implemented",
        ),
        (
            b"PUT /actions HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n",
            "413 Content Too Large",
        ),
        (
            b"PATCH /vm HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\n\xff\xfe}",
            "400 Bad Request",
        ),
    ];
    for (request, status) in cases {
        let text = raw_exchange(&sock, request);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status}\r\n")),
            "{:?} -> {text}",
            String::from_utf8_lossy(request)
        );
        assert!(text.contains("{\"fault_message\":\""), "{text}");
    }

    // An oversized header section, sent without ever ending it.
    let mut huge = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
    huge.resize(20 * 1024, b'a');
    let text = raw_exchange(&sock, &huge);
    assert!(
        text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{text}"
    );

    // None of that reached the VMM, and the server still works.
    assert!(vmm.requests().is_empty());
    assert_eq!(call(&sock, "GET", "/", None).status, 200);
}

#[test]
fn idle_keep_alive_connection_does_not_block_others() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let vmm = FakeVmm::booted();
    let _server = serve(&sock, &vmm);

    let mut idle = UnixStream::connect(&sock).unwrap();
    idle.write_all(b"GET / HTT").unwrap(); // Half a request, then silence.
    let response =
        client::request_with_timeout(&sock, "GET", "/", None, Duration::from_secs(5)).unwrap();
    assert_eq!(response.status, 200);
}

#[test]
fn bind_fails_while_a_live_server_listens() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let vmm = FakeVmm::booted();
    let _server = serve(&sock, &vmm);

    let err = ApiServer::bind(&sock).unwrap_err();
    assert!(matches!(err, ApiServerError::InUse(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&*sock.to_string_lossy()), "{message}");
    assert!(message.contains("in use"), "{message}");
    // The live server is unaffected.
    assert_eq!(call(&sock, "GET", "/", None).status, 200);
}

#[test]
fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    drop(UnixListener::bind(&sock).unwrap()); // Leaves the file without a listener.
    assert!(sock.exists());

    let vmm = FakeVmm::booted();
    let server = serve(&sock, &vmm);
    assert_eq!(call(&sock, "GET", "/", None).status, 200);

    // Shutdown removes the socket file; afterwards nobody answers.
    server.shutdown();
    assert!(!sock.exists());
    let err = client::request(&sock, "GET", "/", None).unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
}

#[test]
fn bind_refuses_to_delete_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-socket");
    std::fs::write(&path, b"precious").unwrap();
    let err = ApiServer::bind(&path).unwrap_err();
    assert!(matches!(err, ApiServerError::NotASocket(_)), "{err:?}");
    assert!(err.to_string().contains(&*path.to_string_lossy()));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn dropping_an_unspawned_server_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let server = ApiServer::bind(&sock).unwrap();
    assert_eq!(server.path(), sock);
    drop(server);
    assert!(!sock.exists());
}

#[test]
fn cli_commands() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let vmm = FakeVmm::booted();
    let (tx, rx) = mpsc::channel();
    *vmm.shutdown_tx.lock().unwrap() = Some(tx);
    let server = serve(&sock, &vmm);
    let args = || control::SocketArgs {
        api_sock: sock.clone(),
    };

    assert_eq!(control::pause(args()).unwrap(), 0);
    assert_eq!(control::resume(args()).unwrap(), 0);
    let status = control::StatusArgs {
        socket: args(),
        json: false,
    };
    assert_eq!(control::status(status).unwrap(), 0);
    let status = control::StatusArgs {
        socket: args(),
        json: true,
    };
    assert_eq!(control::status(status).unwrap(), 0);

    // `stop` returns once the VMM has gone away: play the VMM's part on another thread.
    let stopper = std::thread::spawn(move || {
        rx.recv().unwrap();
        server.shutdown();
    });
    assert_eq!(control::stop(args()).unwrap(), 0);
    stopper.join().unwrap();
    assert_eq!(
        vmm.requests(),
        [
            ApiRequest::SetVmState(VmStateRequest::Paused),
            ApiRequest::SetVmState(VmStateRequest::Resumed),
            ApiRequest::GetVmInfo,
            ApiRequest::GetVmInfo,
            ApiRequest::Shutdown,
        ]
    );

    // With the VM gone the commands fail, naming the socket.
    let err = control::pause(args()).unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains(&*sock.to_string_lossy()), "{message}");
    assert!(message.contains("is the VM running?"), "{message}");
}

#[test]
fn cli_reports_api_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let vmm = Arc::new(FakeVmm::default()); // Not booted: resume conflicts.
    let _server = serve(&sock, &vmm);
    let err = control::resume(control::SocketArgs {
        api_sock: sock.clone(),
    })
    .unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("the microVM has not been started") && message.contains("409"),
        "{message}"
    );
}

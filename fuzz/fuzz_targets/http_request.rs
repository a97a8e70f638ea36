//! The control API's HTTP/1.1 request parser (vmm/src/api/http.rs): any bytes a client sends.
//! Invariants: a complete request used at most the input, its body is the end of the bytes it
//! used and within the limit, re-parsing exactly those bytes gives the same request; errors map
//! to a 4xx/5xx status; a response the server would send for it parses back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::http::{parse_request, parse_response, ParsedRequest, Response, MAX_BODY_BYTES};

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(ParsedRequest::Complete { request, consumed }) => {
            assert!(consumed <= data.len());
            assert!(request.body.len() <= MAX_BODY_BYTES);
            assert!(request.path.starts_with('/'));
            assert!(data[..consumed].ends_with(&request.body));
            match parse_request(&data[..consumed]) {
                Ok(ParsedRequest::Complete {
                    request: again,
                    consumed: again_consumed,
                }) => {
                    assert_eq!(again, request);
                    assert_eq!(again_consumed, consumed);
                }
                other => panic!("the request's own bytes parse as {other:?}"),
            }
            let response = Response::fault(404, &request.path);
            let bytes = response.to_bytes(request.keep_alive, false);
            let parsed = parse_response(&bytes, true)
                .expect("our response parses")
                .expect("our response is complete");
            assert_eq!(parsed.status, 404);
        }
        Ok(ParsedRequest::Incomplete) => {}
        Err(err) => assert!(
            (400..600).contains(&err.status()),
            "{err}: {}",
            err.status()
        ),
    }
});

//! End-to-end tests of the control API: a real server on 127.0.0.1:0 in front of a fake
//! [`Control`], driven by the real [`Client`] (and by raw `ureq` calls for malformed input).
//!
//! The fake keeps exports in a map and fails in the ways the agent's export table does, so every
//! [`ControlError`] variant crosses the wire and comes back as a readable [`ClientError`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::types::{
    DiskStatus, ExportSpec, ExportStats, ExportStatus, HeatMap, JobSettings, JournalJob,
    TrackerAdd, TrackerStatus,
};
use super::{serve, ApiServer, Client, ClientError, Control, ControlError, EpochHold};
use crate::lease::fence::{Admission, EpochFence};

const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A stand-in for the agent: exports by name; `connections` decides Busy; the path `/fail` fails
/// with an I/O error; the last heat request is remembered; the journal holds one job, of
/// batch `b1`, and every batch asked for is remembered.
#[derive(Debug, Default)]
struct FakeControl {
    exports: Mutex<BTreeMap<String, ExportStatus>>,
    last_heat: Mutex<Option<(String, Option<String>, usize)>>,
    batches_asked: Mutex<Vec<Option<String>>>,
    fence: Mutex<EpochFence>,
}

/// The fake journal's one job: a source job of batch `b1`, interrupted, capped at 32 MiB/s.
fn journal_job() -> JournalJob {
    JournalJob {
        job_id: 7,
        batch: Some("b1".into()),
        export: "vm1".into(),
        role: "source".into(),
        phase: "copying".into(),
        size_bytes: 1 << 30,
        granularity_bytes: 65536,
        destination: Some("10.0.0.2:7451".into()),
        policy: Some("heat".into()),
        settings: Some(JobSettings::sample(crate::migrate::Policy::Heat, 100)),
        reason: None,
    }
}

impl FakeControl {
    fn get(&self, name: &str) -> Result<ExportStatus, ControlError> {
        self.exports
            .lock()
            .expect("fake lock")
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("no export named '{name}'")))
    }

    fn set_connections(&self, name: &str, connections: u64) {
        let mut exports = self.exports.lock().expect("fake lock");
        exports.get_mut(name).expect("export exists").connections = connections;
    }
}

fn tracker_status(name: &str, granularity_bytes: u64) -> TrackerStatus {
    TrackerStatus {
        name: name.to_string(),
        granularity_bytes,
        block_count: (1 << 30) / granularity_bytes,
        dirty_blocks: 0,
        dirty_bytes: 0,
        lost: false,
        half_life_ms: 30_000,
        memory_bytes: 2048,
        state_bytes: 0,
        durable: false,
        state: crate::api::types::TrackerState::Ok,
    }
}

impl Control for FakeControl {
    fn admit_epoch(&self, epoch: u64) -> Result<EpochHold<'_>, ControlError> {
        let mut fence = self.fence.lock().expect("fake lock");
        if fence.check(epoch)? == Admission::Raise {
            fence.raise(epoch);
        }
        // Holds nothing: the command may call `manager_epoch` (`/metrics`).
        Ok(EpochHold::new(()))
    }

    fn manager_epoch(&self) -> u64 {
        self.fence.lock().expect("fake lock").highest
    }

    fn exports(&self) -> Vec<ExportStatus> {
        self.exports
            .lock()
            .expect("fake lock")
            .values()
            .cloned()
            .collect()
    }

    fn add_export(&self, spec: ExportSpec) -> Result<ExportStatus, ControlError> {
        if spec.name.is_empty() || spec.name.contains('/') {
            return Err(ControlError::Invalid(format!(
                "name '{}' is not valid",
                spec.name
            )));
        }
        if spec.path.as_path() == std::path::Path::new("/fail") {
            return Err(ControlError::Io(
                "cannot open image /fail: Input/output error".into(),
            ));
        }
        let mut exports = self.exports.lock().expect("fake lock");
        if exports.contains_key(&spec.name) {
            return Err(ControlError::Exists(format!(
                "export '{}' exists",
                spec.name
            )));
        }
        let status = ExportStatus {
            name: spec.name.clone(),
            path: spec.path,
            read_only: spec.read_only,
            size_bytes: 1 << 30,
            granularity_bytes: spec.granularity_bytes,
            connections: 0,
            trackers: spec
                .trackers
                .iter()
                .map(|t| tracker_status(t, spec.granularity_bytes))
                .collect(),
            stats: ExportStats::default(),
            forwarding: None,
            forward_hold_ms: None,
        };
        exports.insert(spec.name, status.clone());
        Ok(status)
    }

    fn remove_export(&self, name: &str, force: bool) -> Result<(), ControlError> {
        let export = self.get(name)?;
        if export.connections > 0 && !force {
            return Err(ControlError::Busy(format!(
                "export '{name}' has {} connection(s); use --force to close them",
                export.connections
            )));
        }
        self.exports.lock().expect("fake lock").remove(name);
        Ok(())
    }

    fn trackers(&self, export: &str) -> Result<Vec<TrackerStatus>, ControlError> {
        Ok(self.get(export)?.trackers)
    }

    fn add_tracker(&self, export: &str, add: TrackerAdd) -> Result<TrackerStatus, ControlError> {
        let mut exports = self.exports.lock().expect("fake lock");
        let status = exports
            .get_mut(export)
            .ok_or_else(|| ControlError::NotFound(format!("no export named '{export}'")))?;
        if status.trackers.iter().any(|t| t.name == add.name) {
            return Err(ControlError::Exists(format!(
                "export '{export}' already has a tracker '{}'",
                add.name
            )));
        }
        let mut tracker = tracker_status(
            &add.name,
            add.granularity_bytes.unwrap_or(status.granularity_bytes),
        );
        tracker.half_life_ms = add.half_life_ms.unwrap_or(tracker.half_life_ms);
        status.trackers.push(tracker.clone());
        Ok(tracker)
    }

    fn remove_tracker(&self, export: &str, tracker: &str) -> Result<(), ControlError> {
        let mut exports = self.exports.lock().expect("fake lock");
        let status = exports
            .get_mut(export)
            .ok_or_else(|| ControlError::NotFound(format!("no export named '{export}'")))?;
        let before = status.trackers.len();
        status.trackers.retain(|t| t.name != tracker);
        if status.trackers.len() == before {
            return Err(ControlError::NotFound(format!(
                "export '{export}' has no tracker '{tracker}'"
            )));
        }
        Ok(())
    }

    fn heat(
        &self,
        export: &str,
        tracker: Option<&str>,
        cells: usize,
    ) -> Result<HeatMap, ControlError> {
        let status = self.get(export)?;
        let name = match tracker {
            Some(name) => name.to_string(),
            None => status
                .trackers
                .first()
                .map(|t| t.name.clone())
                .ok_or_else(|| {
                    ControlError::NotFound(format!("export '{export}' has no tracker"))
                })?,
        };
        *self.last_heat.lock().expect("fake lock") =
            Some((export.to_string(), tracker.map(str::to_string), cells));
        Ok(HeatMap {
            export: export.to_string(),
            tracker: name,
            granularity_bytes: status.granularity_bytes,
            block_count: 16384,
            cell_bytes: status.size_bytes.div_ceil(cells as u64),
            cells: (0..cells).map(|i| (i % 256) as u8).collect(),
            histogram: vec![(0, 16384)],
            hot_blocks: 0,
        })
    }

    fn migration_status(&self, batch: Option<&str>) -> Result<Vec<DiskStatus>, ControlError> {
        Ok(self
            .journal_jobs(batch)?
            .into_iter()
            .map(|job| DiskStatus {
                job_id: job.job_id,
                batch: job.batch,
                export: job.export,
                role: job.role,
                phase: job.phase,
                peer_state: Some("receiving".into()),
                peer_unreachable: None,
                destination_bytes: Some(16 << 20),
                verdict: "resumable".into(),
                reason: "the destination holds part of the disk".into(),
                action: "ferry resume b1".into(),
                forwarding: None,
                seed: None,
            })
            .collect())
    }

    fn journal_jobs(&self, batch: Option<&str>) -> Result<Vec<JournalJob>, ControlError> {
        self.batches_asked
            .lock()
            .expect("fake lock")
            .push(batch.map(str::to_string));
        let job = journal_job();
        Ok(batch
            .is_none_or(|batch| job.batch.as_deref() == Some(batch))
            .then_some(job)
            .into_iter()
            .collect())
    }
}

/// A server on an ephemeral port, the fake behind it, and a client with the right token.
struct Harness {
    server: ApiServer,
    fake: Arc<FakeControl>,
    addr: String,
    client: Client,
}

fn start() -> Harness {
    let fake = Arc::new(FakeControl::default());
    let bind = "127.0.0.1:0".parse().expect("address");
    let server = serve(bind, TOKEN.to_string(), fake.clone()).expect("serve");
    let addr = server.local_addr().to_string();
    assert_ne!(server.local_addr().port(), 0);
    let client = Client::new(&addr, Some(TOKEN.to_string()));
    Harness {
        server,
        fake,
        addr,
        client,
    }
}

fn spec(name: &str) -> ExportSpec {
    ExportSpec {
        name: name.to_string(),
        path: PathBuf::from(format!("/images/{name}.raw")),
        read_only: false,
        granularity_bytes: 65536,
        trackers: vec!["backup".to_string()],
    }
}

/// A raw call with `ureq`, returning (status, body) whatever the status.
fn raw(method: &str, url: &str, token: Option<&str>, body: Option<&[u8]>) -> (u16, String) {
    let mut request = ureq::request(method, url);
    if let Some(token) = token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    let result = match body {
        Some(body) => request.send_bytes(body),
        None => request.call(),
    };
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(err) => panic!("{method} {url}: {err}"),
    };
    let status = response.status();
    (status, response.into_string().expect("body"))
}

#[test]
fn token_is_required_even_for_metrics() {
    // Goal: no route answers without the right token, /metrics included (it shows export
    // names, sizes and guest I/O). Method: call with no token and a wrong one (client and
    // raw), then /metrics without and with the token.
    let h = start();
    h.client.add_export(&spec("vm1")).expect("add");
    for token in [None, Some("wrong".to_string()), Some(format!("{TOKEN}0"))] {
        let client = Client::new(&h.addr, token);
        let err = client.exports().expect_err("refused");
        assert!(matches!(err, ClientError::Unauthorized { .. }), "{err:?}");
        assert_eq!(err.status(), Some(401));
        assert!(
            err.to_string()
                .starts_with(&format!("agent at {}: ", h.addr)),
            "{err}"
        );
        let err = client.remove_export("vm1", true).expect_err("refused");
        assert_eq!(err.status(), Some(401));
        let err = client.metrics().expect_err("metrics need the token");
        assert_eq!(err.status(), Some(401));
    }
    assert_eq!(
        h.client.exports().expect("still there").len(),
        1,
        "nothing was removed"
    );
    // Unknown routes answer 401 too: nothing is learnt without the token.
    let (status, body) = raw("GET", &format!("http://{}/v1/nope", h.addr), None, None);
    assert_eq!(status, 401);
    assert!(body.contains("\"error\""), "{body}");
    let (status, body) = raw("GET", &format!("http://{}/metrics", h.addr), None, None);
    assert_eq!(status, 401);
    assert!(!body.contains("vm1"), "{body}");
    let metrics = h.client.metrics().expect("metrics with the token");
    assert!(
        metrics.contains("ferry_export_connections{export=\"vm1\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("ferry_tracker_lost{export=\"vm1\",tracker=\"backup\"} 0"));
    h.server.shutdown();
}

#[test]
fn metrics_open_or_on_their_own_address() {
    // Goal: with metrics_open, /metrics answers without the token and nothing else does; a
    // separate metrics address serves /metrics alone, without the token, and no body.
    // Method: serve with both options, call each address with and without the token.
    let fake = Arc::new(FakeControl::default());
    let options = super::ServeOptions {
        metrics_open: true,
        metrics: Some("127.0.0.1:0".parse().expect("address")),
        ..Default::default()
    };
    let bind = "127.0.0.1:0".parse().expect("address");
    let server = super::serve_with(bind, TOKEN.to_string(), fake.clone(), &options).expect("serve");
    let api = server.local_addr();
    let metrics = server.metrics_addr().expect("metrics address");
    assert_ne!(metrics.port(), 0);
    Client::new(&api.to_string(), Some(TOKEN.into()))
        .add_export(&spec("vm1"))
        .expect("add");
    for addr in [api, metrics] {
        let (status, body) = raw("GET", &format!("http://{addr}/metrics"), None, None);
        assert_eq!(status, 200, "{addr}");
        assert!(body.contains("ferry_export_connections{export=\"vm1\"} 0"));
    }
    let (status, _) = raw("GET", &format!("http://{api}/v1/exports"), None, None);
    assert_eq!(status, 401);
    for (method, path, body, want) in [
        ("GET", "/v1/exports", None, 404),
        ("POST", "/metrics", Some(&b"{}"[..]), 400),
        ("DELETE", "/metrics", None, 405),
    ] {
        let url = format!("http://{metrics}{path}");
        let (status, text) = raw(method, &url, Some(TOKEN), body);
        assert_eq!(status, want, "{method} {path}: {text}");
    }
    server.shutdown();
}

#[test]
fn every_route_round_trips() {
    // Goal: each client call reaches the right Control method with the right arguments.
    // Method: add, list, get, add tracker, list trackers, heat, remove tracker, remove export.
    let h = start();
    let added = h.client.add_export(&spec("vm1")).expect("add export");
    assert_eq!(added.name, "vm1");
    assert_eq!(added.trackers.len(), 1);
    assert_eq!(h.client.exports().expect("list"), vec![added.clone()]);
    assert_eq!(h.client.export("vm1").expect("get"), added);
    let add = TrackerAdd {
        name: "since-monday".into(),
        granularity_bytes: Some(4096),
        half_life_ms: Some(500),
        durable: false,
    };
    let tracker = h.client.add_tracker("vm1", &add).expect("add tracker");
    assert_eq!(
        (tracker.granularity_bytes, tracker.half_life_ms),
        (4096, 500)
    );
    let names: Vec<String> = h
        .client
        .trackers("vm1")
        .expect("trackers")
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec!["backup", "since-monday"]);
    let map = h
        .client
        .heat("vm1", Some("since-monday"), 64)
        .expect("heat");
    assert_eq!(
        (map.tracker.as_str(), map.cells.len()),
        ("since-monday", 64)
    );
    let last = h.fake.last_heat.lock().expect("lock").clone();
    assert_eq!(
        last,
        Some(("vm1".to_string(), Some("since-monday".to_string()), 64))
    );
    let map = h
        .client
        .heat("vm1", None, 1_000_000)
        .expect("heat, default tracker");
    assert_eq!(map.tracker, "backup");
    assert_eq!(
        map.cells.len(),
        super::server::MAX_HEAT_CELLS,
        "cells are capped"
    );
    h.client
        .remove_tracker("vm1", "since-monday")
        .expect("remove tracker");
    assert_eq!(h.client.trackers("vm1").expect("trackers").len(), 1);
    h.client.remove_export("vm1", false).expect("remove export");
    assert!(h.client.exports().expect("list").is_empty());
    h.server.shutdown();
}

#[test]
fn status_and_journal_routes_round_trip() {
    // Goal: `ferry status` and the batch listing reach Control with the batch asked for, the
    // answers (settings included) arrive intact, and a bad batch name is refused before
    // Control sees it. Method: status and journal jobs of b1, of all, of b2; then a batch
    // name with a slash through the real client.
    let h = start();
    let lines = h.client.migration_status(Some("b1")).expect("status b1");
    assert_eq!(lines.len(), 1);
    assert_eq!(
        (lines[0].job_id, lines[0].verdict.as_str()),
        (7, "resumable")
    );
    assert_eq!(h.client.migration_status(None).expect("status").len(), 1);
    assert!(h
        .client
        .migration_status(Some("b2"))
        .expect("status b2")
        .is_empty());
    let jobs = h.client.journal_jobs(Some("b1")).expect("jobs b1");
    assert_eq!(jobs, vec![journal_job()]);
    assert!(jobs[0].resumable() && jobs[0].abortable());
    assert!(h
        .client
        .journal_jobs(Some("b2"))
        .expect("jobs b2")
        .is_empty());
    let asked = h.fake.batches_asked.lock().expect("lock").clone();
    let b = |name: &str| Some(name.to_string());
    assert_eq!(asked, vec![b("b1"), None, b("b2"), b("b1"), b("b2")]);
    let err = h
        .client
        .migration_status(Some("../b1"))
        .expect_err("bad batch");
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(err.to_string().contains("batch:"), "{err}");
    assert_eq!(h.fake.batches_asked.lock().expect("lock").len(), 5);
    h.server.shutdown();
}

#[test]
fn control_errors_map_to_statuses_and_messages() {
    // Goal: each ControlError comes back with its status and the agent's sentence, prefixed
    // with the address. Method: provoke NotFound, Exists, Invalid, Busy and Io.
    let h = start();
    h.client.add_export(&spec("vm1")).expect("add");
    let check = |result: Result<(), ClientError>, status: u16, message: &str| {
        let err = result.expect_err(message);
        assert_eq!(err.status(), Some(status), "{err}");
        assert_eq!(err.to_string(), format!("agent at {}: {message}", h.addr));
    };
    check(h.client.trackers("x").map(drop), 404, "no export named 'x'");
    check(
        h.client.remove_tracker("vm1", "nope"),
        404,
        "export 'vm1' has no tracker 'nope'",
    );
    check(
        h.client.add_export(&spec("vm1")).map(drop),
        409,
        "export 'vm1' exists",
    );
    let add = TrackerAdd {
        name: "backup".into(),
        granularity_bytes: None,
        half_life_ms: None,
        durable: false,
    };
    check(
        h.client.add_tracker("vm1", &add).map(drop),
        409,
        "export 'vm1' already has a tracker 'backup'",
    );
    check(
        h.client.add_export(&spec("")).map(drop),
        400,
        "name '' is not valid",
    );
    let mut failing = spec("vm2");
    failing.path = PathBuf::from("/fail");
    check(
        h.client.add_export(&failing).map(drop),
        500,
        "cannot open image /fail: Input/output error",
    );
    h.fake.set_connections("vm1", 2);
    check(
        h.client.remove_export("vm1", false),
        409,
        "export 'vm1' has 2 connection(s); use --force to close them",
    );
    h.client.remove_export("vm1", true).expect("forced");
    check(
        h.client.export("vm1").map(drop),
        404,
        "no export named 'vm1'",
    );
    h.server.shutdown();
}

#[test]
fn malformed_requests_are_client_errors() {
    // Goal: bad input is a 4xx with a JSON error, never a crash; the server keeps serving.
    // Method: raw calls with broken JSON, wrong fields, huge bodies, bad query values,
    // unknown routes and wrong methods; then a normal call.
    let h = start();
    let base = format!("http://{}", h.addr);
    let exports = format!("{base}/v1/exports");
    let cases: Vec<(&str, String, Option<Vec<u8>>, u16)> = vec![
        ("POST", exports.clone(), Some(b"{not json".to_vec()), 400),
        ("POST", exports.clone(), Some(b"".to_vec()), 400),
        (
            "POST",
            exports.clone(),
            Some(br#"{"name":"a","path":"/i","bogus":1}"#.to_vec()),
            400,
        ),
        (
            "POST",
            exports.clone(),
            Some(br#"{"name":5,"path":"/i"}"#.to_vec()),
            400,
        ),
        (
            "POST",
            exports.clone(),
            Some(vec![b' '; super::server::MAX_BODY_BYTES + 1]),
            413,
        ),
        (
            "POST",
            format!("{exports}/vm1/trackers"),
            Some(b"[]".to_vec()),
            400,
        ),
        ("DELETE", format!("{exports}/vm1?force=perhaps"), None, 400),
        ("GET", format!("{exports}/vm1/heat?cells=lots"), None, 400),
        ("GET", format!("{exports}/vm1/heat?cells=0"), None, 400),
        ("GET", format!("{exports}/%zz"), None, 400),
        ("GET", format!("{base}/v1/nope"), None, 404),
        ("GET", format!("{base}/v1/status?batch=..%2Fx"), None, 400),
        (
            "GET",
            format!("{base}/v1/status?batch=a&batch=b"),
            None,
            400,
        ),
        ("GET", format!("{base}/v1/journal/jobs?all=1"), None, 400),
        (
            "GET",
            format!("{base}/v1/journal/jobs?batch=%zz"),
            None,
            400,
        ),
        (
            "POST",
            format!("{base}/v1/status"),
            Some(b"{}".to_vec()),
            405,
        ),
        ("DELETE", format!("{base}/v1/journal/jobs"), None, 405),
        ("GET", format!("{exports}/vm1/trackers/t"), None, 405),
        ("PUT", exports.clone(), Some(b"{}".to_vec()), 405),
        ("POST", format!("{base}/metrics"), Some(b"{}".to_vec()), 405),
    ];
    for (method, url, body, want) in cases {
        let (status, text) = raw(method, &url, Some(TOKEN), body.as_deref());
        assert_eq!(status, want, "{method} {url}: {text}");
        let error: super::types::ErrorBody = serde_json::from_str(&text).expect("JSON error body");
        assert!(!error.error.is_empty());
    }
    assert!(h.client.exports().expect("still serving").is_empty());
    h.server.shutdown();
}

#[test]
fn names_are_percent_encoded_end_to_end() {
    // Goal: a name with URL-special characters reaches Control intact and cannot pick
    // another route. Method: ask for trackers of "a/b?c" and check the 404 message.
    let h = start();
    let err = h.client.trackers("a/b?c d").expect_err("no such export");
    assert_eq!(err.status(), Some(404));
    assert!(
        err.to_string().ends_with("no export named 'a/b?c d'"),
        "{err}"
    );
    h.server.shutdown();
}

#[test]
fn shutdown_is_prompt_and_closes_the_port() {
    // Goal: shutdown returns quickly with idle workers, and the port stops answering.
    // Method: start, serve one call, time shutdown, then expect the client to fail.
    let h = start();
    h.client.exports().expect("served");
    let started = Instant::now();
    let Harness { server, addr, .. } = h;
    server.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let err = Client::new(&addr, Some(TOKEN.into()))
        .exports()
        .expect_err("stopped");
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
}

#[test]
fn bind_conflict_is_an_error() {
    // Goal: a taken port is reported, not a panic. Method: serve twice on one address.
    let h = start();
    let taken = h.server.local_addr();
    let err = serve(taken, TOKEN.into(), h.fake.clone()).expect_err("port in use");
    assert!(matches!(err, super::ApiError::Bind { .. }), "{err:?}");
    assert_eq!(err.to_string(), format!("cannot listen on {taken}"));
    h.server.shutdown();
}

#[test]
fn absurd_declared_body_does_not_take_the_agent_down() {
    // Goal: a petabyte Content-Length, sent before authentication, neither aborts the process
    // nor stops the server (the body is never read: 401, connection closed).
    // Method: write such a request by hand over TCP, wait, then make normal calls.
    use std::io::Write;
    let h = start();
    let mut stream = std::net::TcpStream::connect(&h.addr).expect("connect");
    let head = "POST /v1/exports HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000000\r\n\r\n{";
    stream.write_all(head.as_bytes()).expect("send");
    std::thread::sleep(Duration::from_millis(300));
    drop(stream);
    for _ in 0..2 * super::WORKERS {
        assert!(h.client.exports().expect("still serving").is_empty());
    }
    h.server.shutdown();
}

/// Sends `bytes` on a fresh connection and reads until the server closes it (or 3 s).
fn exchange(addr: &str, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    stream.write_all(bytes).expect("send");
    let mut answer = Vec::new();
    // A reset after the answer (a refused body left unread) ends the read too.
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn keep_alive_pipelining_head_and_continue() {
    // Goal: one connection carries several requests (pipelined in one write), HEAD gets the
    // head only, `Expect: 100-continue` is answered before the body, and `Connection: close`
    // ends the connection. Method: raw bytes over TCP, then read the whole exchange.
    let h = start();
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let body = serde_json::to_string(&spec("vm1")).expect("json");
    let requests = format!(
        "GET /v1/exports HTTP/1.1\r\nHost: x\r\n{auth}\r\n\
         HEAD /v1/exports HTTP/1.1\r\nHost: x\r\n{auth}\r\n\
         POST /v1/exports HTTP/1.1\r\nHost: x\r\n{auth}Expect: 100-continue\r\n\
         Content-Length: {}\r\n\r\n{body}\
         GET /v1/exports/vm1 HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n",
        body.len()
    );
    let answer = exchange(&h.addr, requests.as_bytes());
    let statuses: Vec<&str> = answer
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &answer[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["200", "200", "100", "201", "200"], "{answer}");
    assert_eq!(
        answer.matches("[]").count(),
        1,
        "HEAD has no body: {answer}"
    );
    assert!(answer.ends_with('}'), "{answer}");
    assert_eq!(h.client.exports().expect("listed").len(), 1);
    h.server.shutdown();
}

#[test]
fn hostile_heads_and_bodies_are_refused_and_closed() {
    // Goal: an oversized head gets 431, a malformed one 400, a chunked body 411, a body
    // without the token 401 (unread), an over-limit body with the token 413; each closes the
    // connection, and the server keeps serving. Method: raw requests, read to the close.
    let h = start();
    let long = format!("GET /v1/exports HTTP/1.1\r\nX: {}", "a".repeat(20_000));
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let cases: Vec<(String, &str)> = vec![
        (long, "HTTP/1.1 431 "),
        (
            "GET / HTTP/1.1\r\nBad Header\r\n\r\n".into(),
            "HTTP/1.1 400 ",
        ),
        (
            format!("POST /v1/exports HTTP/1.1\r\n{auth}Transfer-Encoding: chunked\r\n\r\n"),
            "HTTP/1.1 411 ",
        ),
        (
            "POST /v1/exports HTTP/1.1\r\nContent-Length: 5\r\n\r\n".into(),
            "HTTP/1.1 401 ",
        ),
        (
            format!("POST /v1/exports HTTP/1.1\r\n{auth}Content-Length: 99999999\r\n\r\n"),
            "HTTP/1.1 413 ",
        ),
    ];
    for (request, want) in cases {
        let started = Instant::now();
        let answer = exchange(&h.addr, request.as_bytes());
        assert!(answer.starts_with(want), "{want}: {answer}");
        assert!(answer.contains("Connection: close"), "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{want}: not closed"
        );
    }
    assert!(h.client.exports().expect("still serving").is_empty());
    h.server.shutdown();
}

#[test]
fn manager_epochs_are_fenced() {
    // Goal: a manager's epoch is admitted before its command is routed, a stale one is a 409
    // naming both epochs that changes nothing, garbage is a 400, an unauthenticated caller
    // never moves the fence, and calls without the header (the CLI) are not fenced.
    // Method: drive the fake's fence through the client with and without epochs, and raw.
    let h = start();
    let manager = |epoch| Client::new(&h.addr, Some(TOKEN.to_string())).with_epoch(epoch);
    manager(5)
        .add_export(&spec("vm1"))
        .expect("epoch 5 admitted");
    assert_eq!(h.fake.manager_epoch(), 5);
    let err = manager(4)
        .add_export(&spec("vm2"))
        .expect_err("epoch 4 is stale");
    let ClientError::StaleEpoch {
        epoch,
        highest,
        ref message,
        ..
    } = err
    else {
        panic!("{err:?}");
    };
    assert_eq!((epoch, highest), (4, 5));
    assert!(
        message.contains("epoch 4") && message.contains("epoch 5"),
        "{message}"
    );
    assert_eq!(err.status(), Some(409));
    assert!(manager(4).exports().is_err(), "reads are fenced too");
    assert_eq!(h.client.exports().expect("no header: not fenced").len(), 1);
    h.client
        .add_export(&spec("vm3"))
        .expect("the CLI still works");
    manager(6)
        .remove_export("vm3", true)
        .expect("epoch 6 admitted");
    assert_eq!(h.fake.manager_epoch(), 6);
    let metrics = h.client.metrics().expect("metrics");
    assert!(metrics.contains("\nferry_manager_epoch 6\n"), "{metrics}");
    let ask = |epoch: &str, token: &str| {
        exchange(
            &h.addr,
            format!(
                "GET /v1/exports HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\
                 Ferry-Manager-Epoch: {epoch}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
    };
    let answer = ask("5", TOKEN);
    assert!(answer.starts_with("HTTP/1.1 409 "), "{answer}");
    assert!(
        answer.contains("\"stale_epoch\":{\"epoch\":5,\"highest\":6}"),
        "{answer}"
    );
    for garbage in ["x", "-1", "07", "99999999999999999999"] {
        let answer = ask(garbage, TOKEN);
        assert!(answer.starts_with("HTTP/1.1 400 "), "{garbage}: {answer}");
        assert!(answer.contains("Ferry-Manager-Epoch"), "{answer}");
    }
    assert!(ask("99", "wrong").starts_with("HTTP/1.1 401 "));
    assert_eq!(h.fake.manager_epoch(), 6, "no token, no raise");
    assert!(ask("6", TOKEN).starts_with("HTTP/1.1 200 "));
    let metrics = manager(6).metrics().expect("a manager reads /metrics too");
    assert!(metrics.contains("\nferry_manager_epoch 6\n"), "{metrics}");
}

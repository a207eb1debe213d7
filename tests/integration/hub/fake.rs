//! A local server that answers the Hub's URL paths with the Hub's headers: downloads (`x-repo-commit`, `etag`,
//! `content-range` for `Range` requests, `x-error-code` on errors), and uploads as `huggingface_hub` makes them
//! (repo creation, preupload, the Git LFS batch API with "basic" and "multipart" transfers, verify, ndjson
//! commits). What is committed is kept, and served back on the download paths.

use base64::Engine;
use prefalign::data::hub::HubSettings;
use prefalign::model::push::git_blob_sha1;
use serde_json::{json, Value};
use sha2::Digest;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The default endpoint, which the LFS batch answers use for verify URLs (the client must put HF_ENDPOINT there).
const HUB: &str = "https://huggingface.co";
/// LFS objects larger than this are uploaded in parts of `PART` bytes.
const MULTIPART_ABOVE: usize = 1 << 20;
const PART: usize = 512 * 1024;
const LFS_TYPE: &str = "application/vnd.git-lfs+json";

/// What the server answers on one path.
#[derive(Clone)]
pub enum Reply {
    Json(String),
    /// A file at a commit; `truncate` sends the headers of the whole range but only half of its bytes, then closes.
    File {
        bytes: Vec<u8>,
        commit: String,
        truncate: bool,
    },
    /// HTTP 404 with the Hub's `x-error-code` (RepoNotFound, RevisionNotFound, EntryNotFound).
    Missing(&'static str),
}

/// A commit the server took.
#[derive(Debug, Clone)]
pub struct Commit {
    pub repo: String,
    pub summary: String,
    /// paths written, in the order of the request
    pub paths: Vec<String>,
}

/// Routes of a fake Hub; unknown paths are answered like a missing repo.
#[derive(Default)]
pub struct FakeHub {
    pub routes: HashMap<String, Reply>,
    /// When set, every request to the Hub must carry `Authorization: Bearer <token>` (a private repo, or pushes).
    pub token: Option<String>,
    /// Answer commits with this status (and a Hub error message) instead of making them.
    pub fail_commit: Option<u16>,
    /// Repos created, with the visibility asked for.
    pub created: Vec<(String, Option<String>)>,
    pub commits: Vec<Commit>,
    /// The files of each repo's main branch.
    pub files: HashMap<String, BTreeMap<String, Vec<u8>>>,
    /// LFS objects by sha256, and multipart parts (oid, part number) not yet completed.
    objects: HashMap<String, Vec<u8>>,
    parts: HashMap<(String, usize), Vec<u8>>,
    /// The server's own address, for the URLs it hands out.
    base: String,
}

impl FakeHub {
    /// A repo at `rev`: the listing at `/api/{kind}s/{repo}/revision/{rev}` and each file at `resolve`.
    pub fn repo(mut self, kind: &str, repo: &str, rev: &str, commit: &str, files: &[(&str, &[u8])]) -> Self {
        self.add_repo(kind, repo, rev, commit, files);
        self
    }

    fn add_repo(&mut self, kind: &str, repo: &str, rev: &str, commit: &str, files: &[(&str, &[u8])]) {
        let rev = rev.replace('/', "%2F");
        let siblings: Vec<_> = files.iter().map(|(name, _)| json!({ "rfilename": name })).collect();
        let info = json!({ "id": repo, "sha": commit, "siblings": siblings }).to_string();
        self.routes.insert(format!("/api/{kind}s/{repo}/revision/{rev}"), Reply::Json(info.clone()));
        if rev == "main" {
            self.routes.insert(format!("/api/{kind}s/{repo}"), Reply::Json(info));
        }
        let prefix = if kind == "dataset" { format!("/datasets/{repo}") } else { format!("/{repo}") };
        for (name, bytes) in files {
            let reply = Reply::File { bytes: bytes.to_vec(), commit: commit.into(), truncate: false };
            self.routes.insert(format!("{prefix}/resolve/{rev}/{name}"), reply);
        }
    }

    pub fn missing(mut self, path: &str, code: &'static str) -> Self {
        self.routes.insert(path.into(), Reply::Missing(code));
        self
    }

    pub fn truncating(mut self) -> Self {
        for reply in self.routes.values_mut() {
            if let Reply::File { truncate, .. } = reply {
                *truncate = true;
            }
        }
        self
    }

    pub fn serve(self) -> Server {
        Server::start(self)
    }
}

/// The running fake Hub; stops when dropped, or by itself after five minutes.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<String>>>,
    hub: Arc<Mutex<FakeHub>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(mut hub: FakeHub) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        hub.base = format!("http://{addr}");
        let hub = Arc::new(Mutex::new(hub));
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop2, log2, hub2) = (stop.clone(), log.clone(), hub.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = answer(&hub2, stream, &log2);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { addr, stop, log, hub, thread: Some(thread) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Request paths served so far (and forgets them).
    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.log.lock().unwrap())
    }

    /// The hub's state: what was created and committed.
    pub fn hub(&self) -> MutexGuard<'_, FakeHub> {
        self.hub.lock().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One HTTP request.
struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Request {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// An answer: status line, extra headers, body, and the Content-Length claimed (more than sent: a cut connection).
struct Response {
    status: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    claimed: usize,
}

fn json_response(status: &'static str, value: Value) -> Response {
    let body = value.to_string().into_bytes();
    Response { status, headers: vec![("Content-Type", "application/json".into())], claimed: body.len(), body }
}

fn error(status: &'static str, message: &str) -> Response {
    json_response(status, json!({ "error": message }))
}

/// Answers one request (the connection is closed after it, so the client never reuses it).
fn answer(hub: &Mutex<FakeHub>, stream: TcpStream, log: &Mutex<Vec<String>>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or("GET").to_string();
    let path = words.next().unwrap_or("/").split('?').next().unwrap().to_string();
    let mut headers = HashMap::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    log.lock().unwrap().push(path.clone());
    // Storage (S3) wants a Content-Length; so does this server.
    let response = if headers.get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        error("411 Length Required", "chunked transfer encoding is not accepted")
    } else {
        let length: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let request = Request { method, path, headers, body };
        respond(&mut hub.lock().unwrap(), &request)
    };
    let mut out = stream;
    let mut head =
        format!("HTTP/1.1 {}\r\nContent-Length: {}\r\nConnection: close\r\n", response.status, response.claimed);
    for (k, v) in &response.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    out.write_all(head.as_bytes())?;
    out.write_all(b"\r\n")?;
    out.write_all(&response.body)?;
    out.flush()
}

fn respond(hub: &mut FakeHub, request: &Request) -> Response {
    let path = request.path.as_str();
    let authorization = request.headers.get("authorization");
    // Storage URLs are presigned: a client that sends the Hub token there leaks it.
    if path.starts_with("/storage/") {
        if authorization.is_some() {
            return error("400 Bad Request", "the Hub token was sent to a storage URL");
        }
        return storage(hub, request);
    }
    if let Some(token) = &hub.token {
        if authorization != Some(&format!("Bearer {token}")) {
            let body = br#"{"error":"Invalid credentials in Authorization header"}"#.to_vec();
            let headers = vec![("x-error-code", "RepoNotFound".to_string())];
            return Response { status: "401 Unauthorized", headers, claimed: body.len(), body };
        }
    }
    if request.method == "POST" {
        if path == "/api/repos/create" {
            return create_repo(hub, request);
        }
        if path == "/lfs-verify" {
            let body = request.json();
            let oid = body["oid"].as_str().unwrap_or_default();
            return match hub.objects.get(oid) {
                Some(bytes) if Some(bytes.len() as u64) == body["size"].as_u64() => json_response("200 OK", json!({})),
                _ => error("404 Not Found", "no such object"),
            };
        }
        if let Some(rest) = path.strip_prefix("/api/models/") {
            if let Some((repo, _)) = rest.split_once("/preupload/") {
                return preupload(hub, repo, request);
            }
            if let Some((repo, revision)) = rest.split_once("/commit/") {
                assert_eq!(revision, "main");
                return commit(hub, repo, request);
            }
        }
        if let Some(repo) = path.strip_suffix(".git/info/lfs/objects/batch") {
            return lfs_batch(hub, &repo[1..], request);
        }
    }
    match hub.routes.get(path).cloned().unwrap_or(Reply::Missing("RepoNotFound")) {
        Reply::Json(body) => {
            let body = body.into_bytes();
            Response {
                status: "200 OK",
                headers: vec![("Content-Type", "application/json".into())],
                claimed: body.len(),
                body,
            }
        }
        Reply::Missing(code) => {
            let body = format!(r#"{{"error":"{code}"}}"#).into_bytes();
            Response {
                status: "404 Not Found",
                headers: vec![("x-error-code", code.into())],
                claimed: body.len(),
                body,
            }
        }
        Reply::File { bytes, commit, truncate } => {
            // `Range: bytes=a-` or `bytes=a-b`, as hf-hub sends (0-0 to read the metadata, then from the resume point).
            let (start, end) = request
                .headers
                .get("range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.split_once('-'))
                .map(|(a, b)| {
                    (a.parse().unwrap(), b.parse().map_or(bytes.len() - 1, |b: usize| b.min(bytes.len() - 1)))
                })
                .unwrap_or((0, bytes.len() - 1));
            let body = &bytes[start..=end];
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut hasher);
            let headers = vec![
                ("x-repo-commit", commit),
                ("etag", format!("\"{:016x}\"", hasher.finish())),
                ("content-range", format!("bytes {start}-{end}/{}", bytes.len())),
            ];
            let sent = if truncate && body.len() > 1 { &body[..body.len() / 2] } else { body };
            Response { status: "206 Partial Content", headers, body: sent.to_vec(), claimed: body.len() }
        }
    }
}

fn create_repo(hub: &mut FakeHub, request: &Request) -> Response {
    let body = request.json();
    assert_eq!(body["type"], "model", "{body}");
    let name = body["name"].as_str().expect("a name");
    // A bare name goes to the token owner's namespace.
    let repo = format!("{}/{name}", body["organization"].as_str().unwrap_or("tester"));
    let url = format!("{}/{repo}", hub.base);
    if hub.files.contains_key(&repo) {
        return json_response("409 Conflict", json!({ "error": "You already created this model repo", "url": url }));
    }
    hub.created.push((repo.clone(), body["visibility"].as_str().map(str::to_string)));
    hub.files.insert(repo.clone(), BTreeMap::new());
    hub.add_repo("model", &repo, "main", &format!("{:040x}", 0), &[]);
    json_response("200 OK", json!({ "url": url, "name": repo }))
}

/// LFS for weights and binary content (as .gitattributes and the Hub's sniffing decide), regular files otherwise.
fn preupload(hub: &FakeHub, repo: &str, request: &Request) -> Response {
    let Some(files) = hub.files.get(repo) else { return error("404 Not Found", "Repository not found") };
    let mut answers = Vec::new();
    for file in request.json()["files"].as_array().expect("files") {
        let path = file["path"].as_str().unwrap();
        let sample = base64::engine::general_purpose::STANDARD.decode(file["sample"].as_str().unwrap()).unwrap();
        assert!(sample.len() <= 512 && sample.len() as u64 <= file["size"].as_u64().unwrap());
        let lfs = path.ends_with(".safetensors") || path.ends_with(".bin") || sample.contains(&0);
        let mut answer =
            json!({ "path": path, "uploadMode": if lfs { "lfs" } else { "regular" }, "shouldIgnore": false });
        if let Some(bytes) = files.get(path) {
            answer["oid"] = json!(if lfs { sha256(bytes) } else { git_blob_sha1(bytes) });
        }
        answers.push(answer);
    }
    json_response("200 OK", json!({ "files": answers }))
}

fn lfs_batch(hub: &FakeHub, repo: &str, request: &Request) -> Response {
    assert_eq!(request.headers.get("accept").map(String::as_str), Some(LFS_TYPE));
    if !hub.files.contains_key(repo) {
        return error("404 Not Found", "Repository not found");
    }
    let body = request.json();
    assert_eq!((body["operation"].as_str(), body["hash_algo"].as_str()), (Some("upload"), Some("sha256")), "{body}");
    let mut objects = Vec::new();
    for object in body["objects"].as_array().expect("objects") {
        let (oid, size) = (object["oid"].as_str().unwrap(), object["size"].as_u64().unwrap() as usize);
        if hub.objects.contains_key(oid) {
            objects.push(json!({ "oid": oid, "size": size }));
            continue;
        }
        let verify = json!({ "href": format!("{HUB}/lfs-verify"), "header": {} });
        let upload = if size > MULTIPART_ABOVE {
            let mut header = json!({ "chunk_size": PART.to_string() });
            for part in 1..=size.div_ceil(PART) {
                header[format!("{part:05}")] = json!(format!("{}/storage/{oid}/part/{part}", hub.base));
            }
            json!({ "href": format!("{}/storage/{oid}/complete", hub.base), "header": header })
        } else {
            json!({ "href": format!("{}/storage/{oid}", hub.base) })
        };
        objects.push(json!({ "oid": oid, "size": size, "actions": { "upload": upload, "verify": verify } }));
    }
    let mut response = json_response("200 OK", json!({ "transfer": "basic", "objects": objects }));
    response.headers = vec![("Content-Type", LFS_TYPE.into())];
    response
}

/// The presigned storage: `PUT /storage/{oid}` (basic), `PUT /storage/{oid}/part/{n}` and
/// `POST /storage/{oid}/complete` (multipart).
fn storage(hub: &mut FakeHub, request: &Request) -> Response {
    let rest = request.path.strip_prefix("/storage/").unwrap();
    let store = |hub: &mut FakeHub, oid: &str, bytes: Vec<u8>| {
        if sha256(&bytes) != oid {
            return error("400 Bad Request", "the content does not match its oid");
        }
        hub.objects.insert(oid.to_string(), bytes);
        json_response("200 OK", json!({}))
    };
    match (request.method.as_str(), rest.split('/').collect::<Vec<_>>().as_slice()) {
        ("PUT", [oid]) => store(hub, oid, request.body.clone()),
        ("PUT", [oid, "part", n]) => {
            hub.parts.insert((oid.to_string(), n.parse().unwrap()), request.body.clone());
            let mut response = json_response("200 OK", json!({}));
            response.headers.push(("etag", format!("\"etag-{oid}-{n}\"")));
            response
        }
        ("POST", [oid, "complete"]) => {
            let body = request.json();
            assert_eq!(body["oid"].as_str(), Some(*oid));
            let mut bytes = Vec::new();
            for (i, part) in body["parts"].as_array().expect("parts").iter().enumerate() {
                let n = part["partNumber"].as_u64().unwrap() as usize;
                assert_eq!(n, i + 1);
                assert_eq!(part["etag"].as_str(), Some(format!("\"etag-{oid}-{n}\"").as_str()));
                bytes.extend(hub.parts.remove(&(oid.to_string(), n)).expect("the part was uploaded"));
            }
            store(hub, oid, bytes)
        }
        _ => error("404 Not Found", "no such storage URL"),
    }
}

fn commit(hub: &mut FakeHub, repo: &str, request: &Request) -> Response {
    if let Some(status) = hub.fail_commit {
        let status = match status {
            403 => "403 Forbidden",
            _ => "500 Internal Server Error",
        };
        let message = format!("You don't have the rights to create a commit in {repo}");
        let mut response = error(status, &message);
        response.headers.push(("x-error-message", message));
        return response;
    }
    assert_eq!(request.headers.get("content-type").map(String::as_str), Some("application/x-ndjson"));
    if !hub.files.contains_key(repo) {
        return error("404 Not Found", "Repository not found");
    }
    let lines: Vec<Value> = request
        .body
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(lines[0]["key"], "header");
    let summary = lines[0]["value"]["summary"].as_str().unwrap().to_string();
    let mut written = Vec::new();
    for line in &lines[1..] {
        let value = &line["value"];
        let path = value["path"].as_str().unwrap().to_string();
        let bytes = match line["key"].as_str() {
            Some("file") => {
                assert_eq!(value["encoding"], "base64");
                base64::engine::general_purpose::STANDARD.decode(value["content"].as_str().unwrap()).unwrap()
            }
            Some("lfsFile") => {
                assert_eq!(value["algo"], "sha256");
                match hub.objects.get(value["oid"].as_str().unwrap()) {
                    Some(bytes) => bytes.clone(),
                    None => return error("400 Bad Request", &format!("LFS object of {path} not found")),
                }
            }
            other => panic!("unexpected commit line {other:?}"),
        };
        written.push((path, bytes));
    }
    let paths = written.iter().map(|(p, _)| p.clone()).collect();
    hub.commits.push(Commit { repo: repo.to_string(), summary, paths });
    let sha = format!("{:040x}", hub.commits.len());
    let files = hub.files.get_mut(repo).unwrap();
    files.extend(written);
    let files: Vec<(String, Vec<u8>)> = files.iter().map(|(p, b)| (p.clone(), b.clone())).collect();
    let files: Vec<(&str, &[u8])> = files.iter().map(|(p, b)| (p.as_str(), b.as_slice())).collect();
    hub.add_repo("model", repo, "main", &sha, &files);
    let url = format!("{}/{repo}/commit/{sha}", hub.base);
    json_response("200 OK", json!({ "success": true, "commitOid": sha, "commitUrl": url, "pullRequestUrl": null }))
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// Settings that point at `endpoint`, with the cache in `home` (tests pass these instead of setting HF_* variables:
/// the other tests of this binary, and the processes they start, must not see the fake Hub).
pub fn settings(endpoint: &str, home: &Path) -> HubSettings {
    HubSettings { endpoint: endpoint.to_string(), home: home.to_path_buf(), offline: false, token: None }
}

pub fn err_text<T: std::fmt::Debug>(result: anyhow::Result<T>) -> String {
    format!("{:#}", result.expect_err("expected an error"))
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

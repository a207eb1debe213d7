//! Uploads to the Hugging Face Hub: creating a model repo and committing a folder to it, as `huggingface_hub`
//! (2.4) does for transformers' `Trainer.push_to_hub`; and the model card (README.md) TRL writes beside a trained
//! model.
//!
//! A commit takes four kinds of request, all through the Hub's HTTP API (no git):
//! - `POST {endpoint}/api/models/{repo}/preupload/{revision}` with each file's size and first 512 bytes: the Hub
//!   answers which files go through Git LFS (`uploadMode`), and the ids of the files it already has (`oid`);
//! - the Git LFS batch API (`POST {endpoint}/{repo}.git/info/lfs/objects/batch`, sha256 object ids): where to upload
//!   each LFS file's content (nothing for content the Hub already stores), then the upload (one `PUT`, or one per
//!   part with a completion request), then `verify` when the server asks for it;
//! - `POST {endpoint}/api/models/{repo}/commit/{revision}` as `application/x-ndjson`: a header line, then regular
//!   files inline (base64) and LFS files by sha256.
//!
//! Files whose content the repo already has are left out of the commit, and a commit left with nothing is not
//! made, as `huggingface_hub` does. The token (`HF_TOKEN`, else `$HF_HOME/token`) is sent to the Hub only: never to
//! the storage URLs the LFS batch API hands out.

use crate::data::hub::HubSettings;
use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use serde_json::{json, Map, Value};
use sha1::Digest;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The branch commits go to (transformers' `hub_revision` unset).
const REVISION: &str = "main";
/// `huggingface_hub`'s `_HF_DEFAULT_ENDPOINT`, replaced by `HF_ENDPOINT` in the URLs the LFS batch API returns.
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Files per preupload or LFS batch request, as `huggingface_hub` chunks them.
const CHUNK: usize = 256;
const LFS_CONTENT_TYPE: &str = "application/vnd.git-lfs+json";
/// Paths `huggingface_hub.upload_folder` always leaves out (`DEFAULT_IGNORE_PATTERNS`).
const DEFAULT_IGNORED: [&str; 2] = [".git", ".cache/huggingface"];

/// A commit that was made, or the repo's head when nothing had changed.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitInfo {
    /// "org/name", as the Hub names the repo (a bare name gets the token owner's namespace)
    pub repo_id: String,
    pub commit_url: String,
    /// the commit's id
    pub oid: String,
    /// files the commit wrote
    pub committed: usize,
    /// files left out because the repo already held them as they are
    pub unchanged: usize,
}

/// One file of a commit: where it goes in the repo and where it is here.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    pub path_in_repo: String,
    pub local: PathBuf,
}

/// Creates the model repo `repo_id` if needed (`private`: as a private repo; else the Hub's default for the
/// namespace) and commits the files of `folder` to its main branch, leaving out what `Trainer.push_to_hub` leaves
/// out (see [`folder_files`]). `settings.token` is the token, else `$HF_HOME/token` is read.
pub fn push_folder(
    settings: &HubSettings,
    repo_id: &str,
    folder: &Path,
    private: bool,
    commit_message: &str,
) -> Result<CommitInfo> {
    let client = HubClient::new(settings)?;
    let repo_id = client.create_repo(repo_id, private)?;
    client.commit(&repo_id, &folder_files(folder, "", true)?, commit_message)
}

/// The files under `folder`, each at `prefix` + its path relative to `folder` in the repo, sorted; left out are
/// what `huggingface_hub.upload_folder` always leaves out (`.git`, `.cache/huggingface`), prefalign's own lock and
/// half-written files (`.prefalign.lock`, `.*.partial`), and with `trainer_ignores` what `Trainer.push_to_hub`
/// passes as `ignore_patterns`: `checkpoint-*` folders and paths starting with `_`.
pub fn folder_files(folder: &Path, prefix: &str, trainer_ignores: bool) -> Result<Vec<Upload>> {
    if !folder.is_dir() {
        bail!("{} is not a folder", folder.display());
    }
    let mut files = Vec::new();
    let mut stack = vec![folder.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
            let path = entry.path();
            let relative = path.strip_prefix(folder).expect("under the folder");
            let relative: Vec<String> = relative.components().map(|c| c.as_os_str().to_string_lossy().into()).collect();
            let relative = relative.join("/");
            let name = entry.file_name().to_string_lossy().into_owned();
            let ignored = DEFAULT_IGNORED.iter().any(|d| relative == *d || relative.starts_with(&format!("{d}/")))
                || name == crate::files::LOCK_FILE
                || (name.starts_with('.') && name.ends_with(".partial"))
                || (trainer_ignores && (relative.starts_with("checkpoint-") || relative.starts_with('_')));
            if ignored {
                continue;
            }
            // Follows links, as upload_folder does.
            let meta = std::fs::metadata(&path).with_context(|| format!("cannot read {}", path.display()))?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                files.push(Upload { path_in_repo: format!("{prefix}{relative}"), local: path });
            }
        }
    }
    files.sort_by(|a, b| a.path_in_repo.cmp(&b.path_in_repo));
    Ok(files)
}

/// The Hub's API with a token.
pub struct HubClient {
    agent: ureq::Agent,
    endpoint: String,
    token: String,
}

/// A file of a commit once the Hub has said how it is uploaded.
struct Planned<'a> {
    upload: &'a Upload,
    size: u64,
    lfs: bool,
    /// sha256 of the content for LFS files, git's blob sha1 for regular ones
    oid: String,
    /// a regular file's content
    content: Option<Vec<u8>>,
    /// the repo holds this file as it is
    unchanged: bool,
}

impl HubClient {
    /// A client for `settings.endpoint` with `settings.token`, else the token `hf auth login` saved in
    /// `$HF_HOME/token`; fails when there is none, or when `HF_HUB_OFFLINE` is set.
    pub fn new(settings: &HubSettings) -> Result<Self> {
        if settings.offline {
            bail!("HF_HUB_OFFLINE is set: nothing can be pushed to the Hub (unset it to push)");
        }
        let token = settings.token.clone().or_else(|| token_file(&settings.home)).context(
            "pushing to the Hub needs a token with write access: pass --hub-token, set HF_TOKEN, or log in with \
             `hf auth login` (which saves it in $HF_HOME/token)",
        )?;
        let agent = ureq::AgentBuilder::new()
            .user_agent(&format!("prefalign/{}", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(300))
            .timeout_write(Duration::from_secs(300))
            .build();
        Ok(Self { agent, endpoint: settings.endpoint.trim_end_matches('/').to_string(), token })
    }

    /// Creates the model repo `repo_id` ("org/name", or a bare name in the token owner's namespace) unless it
    /// exists; returns its full id. `private`: a private repo, else the namespace's default (`huggingface_hub`
    /// sends `visibility` only when `private` is given).
    pub fn create_repo(&self, repo_id: &str, private: bool) -> Result<String> {
        let (organization, name) = match repo_id.split_once('/') {
            Some((org, name)) => (Some(org), name),
            None => (None, repo_id),
        };
        let mut payload = json!({ "name": name, "organization": organization, "type": "model" });
        if private {
            payload["visibility"] = json!("private");
        }
        let url = format!("{}/api/repos/create", self.endpoint);
        let what = || format!("cannot create the model repo {repo_id} at {}", self.endpoint);
        let mut attempts = 0;
        let body = loop {
            match self.authorized(self.agent.post(&url)).send_json(&payload) {
                Ok(response) => break response.into_string().unwrap_or_default(),
                Err(ureq::Error::Status(409, response)) => {
                    let body = response.into_string().unwrap_or_default();
                    // The Hub creates one repo per user at a time; huggingface_hub tries again.
                    if !body.contains("another conflicting operation is in progress") {
                        break body; // it exists already (the body still names it)
                    }
                    attempts += 1;
                    if attempts == 5 {
                        bail!("{}: HTTP 409: {body}", what());
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                // A token without the right to create repos may still write to one that exists, as the Hub tells.
                Err(ureq::Error::Status(401..=403, response)) if repo_id.contains('/') => {
                    let info = format!("{}/api/models/{repo_id}", self.endpoint);
                    if self.authorized(self.agent.get(&info)).call().is_err() {
                        return Err(http_error(&what(), ureq::Error::Status(response.status(), response)));
                    }
                    break String::new();
                }
                Err(e) => return Err(http_error(&what(), e)),
            }
        };
        let url = serde_json::from_str::<Value>(&body).ok().and_then(|v| v["url"].as_str().map(str::to_string));
        // RepoUrl: the last two parts of the repo's URL are its namespace and name.
        let from_url = url.as_deref().and_then(|u| {
            let mut parts = u.trim_end_matches('/').rsplit('/');
            let (name, namespace) = (parts.next()?, parts.next()?);
            Some(format!("{namespace}/{name}"))
        });
        match (from_url, repo_id.contains('/')) {
            (Some(id), _) => Ok(id),
            (None, true) => Ok(repo_id.to_string()),
            (None, false) => bail!("{}: the Hub did not say in which namespace; pass org/{repo_id}", what()),
        }
    }

    /// Commits `files` to the main branch of model repo `repo_id` with `message`.
    pub fn commit(&self, repo_id: &str, files: &[Upload], message: &str) -> Result<CommitInfo> {
        if files.is_empty() {
            bail!("nothing to push to {repo_id}: no files");
        }
        let mut planned = self.plan(repo_id, files)?;
        let total = planned.len();
        planned.retain(|p| !p.unchanged);
        let unchanged = total - planned.len();
        if planned.is_empty() {
            tracing::info!("{repo_id}: no file changed since its last commit; nothing to commit");
            let url = format!("{}/api/models/{repo_id}/revision/{}", self.endpoint, quote(REVISION));
            let what = format!("cannot read the head of {repo_id} at {}", self.endpoint);
            let info: Value = self.send(&what, self.authorized(self.agent.get(&url)), Body::Empty)?.into_json()?;
            let oid = info["sha"].as_str().with_context(|| format!("{what}: the answer has no \"sha\""))?;
            let commit_url = format!("{}/{repo_id}/commit/{oid}", self.endpoint);
            return Ok(CommitInfo { repo_id: repo_id.into(), commit_url, oid: oid.into(), committed: 0, unchanged });
        }
        self.upload_lfs(repo_id, &planned)?;
        let mut lines = vec![json!({"key": "header", "value": {"summary": message, "description": ""}})];
        for p in &planned {
            lines.push(match &p.content {
                Some(content) => json!({"key": "file", "value": {
                    "content": base64::engine::general_purpose::STANDARD.encode(content),
                    "path": p.upload.path_in_repo,
                    "encoding": "base64",
                }}),
                None => json!({"key": "lfsFile", "value": {
                    "path": p.upload.path_in_repo, "algo": "sha256", "oid": p.oid, "size": p.size,
                }}),
            });
        }
        let mut body = Vec::new();
        for line in &lines {
            serde_json::to_writer(&mut body, line)?;
            body.push(b'\n');
        }
        let url = format!("{}/api/models/{repo_id}/commit/{}", self.endpoint, quote(REVISION));
        let what = format!("cannot commit {} file(s) to {repo_id} at {}", planned.len(), self.endpoint);
        // Not retried (huggingface_hub neither): a commit whose answer was lost would be made twice.
        let request = self.authorized(self.agent.post(&url)).set("Content-Type", "application/x-ndjson");
        let answer: Value = request.send_bytes(&body).map_err(|e| http_error(&what, e))?.into_json()?;
        let field = |name: &str| {
            answer[name].as_str().map(str::to_string).with_context(|| format!("{what}: the answer has no {name:?}"))
        };
        Ok(CommitInfo {
            repo_id: repo_id.into(),
            commit_url: field("commitUrl")?,
            oid: field("commitOid")?,
            committed: planned.len(),
            unchanged,
        })
    }

    /// Asks the Hub how each file goes (preupload) and hashes it accordingly.
    fn plan<'a>(&self, repo_id: &str, files: &'a [Upload]) -> Result<Vec<Planned<'a>>> {
        let url = format!("{}/api/models/{repo_id}/preupload/{}", self.endpoint, quote(REVISION));
        let what = format!("cannot prepare the upload to {repo_id} at {}", self.endpoint);
        let mut planned = Vec::new();
        for chunk in files.chunks(CHUNK) {
            let mut entries = Vec::new();
            let mut sizes = Vec::new();
            for upload in chunk {
                let (size, sample) = size_and_sample(&upload.local)?;
                entries.push(json!({
                    "path": upload.path_in_repo,
                    "sample": base64::engine::general_purpose::STANDARD.encode(&sample),
                    "size": size,
                }));
                sizes.push(size);
            }
            let payload = json!({ "files": entries });
            let answer: Value =
                self.send(&what, self.authorized(self.agent.post(&url)), Body::Json(&payload))?.into_json()?;
            let modes = answer["files"].as_array().with_context(|| format!("{what}: the answer has no \"files\""))?;
            for (upload, size) in chunk.iter().zip(sizes) {
                let mode = modes
                    .iter()
                    .find(|m| m["path"].as_str() == Some(upload.path_in_repo.as_str()))
                    .with_context(|| format!("{what}: the answer does not mention {}", upload.path_in_repo))?;
                if mode["shouldIgnore"].as_bool() == Some(true) {
                    tracing::info!("{}: ignored by the repo's .gitignore", upload.path_in_repo);
                    continue;
                }
                // Empty files cannot go through LFS (huggingface_hub uploads them as regular files too).
                let lfs = match mode["uploadMode"].as_str() {
                    Some("lfs") => size > 0,
                    Some("regular") => false,
                    other => bail!("{what}: unknown upload mode {other:?} for {}", upload.path_in_repo),
                };
                let (oid, content) = if lfs {
                    (sha256_file(&upload.local)?, None)
                } else {
                    let content = std::fs::read(&upload.local)
                        .with_context(|| format!("cannot read {}", upload.local.display()))?;
                    (git_blob_sha1(&content), Some(content))
                };
                let unchanged = mode["oid"].as_str() == Some(oid.as_str());
                planned.push(Planned { upload, size, lfs, oid, content, unchanged });
            }
        }
        Ok(planned)
    }

    /// Uploads the content of the LFS files the Hub does not store yet.
    fn upload_lfs(&self, repo_id: &str, planned: &[Planned]) -> Result<()> {
        // One object per content, however many files hold it.
        let mut lfs: Vec<&Planned> = Vec::new();
        for p in planned.iter().filter(|p| p.lfs) {
            if !lfs.iter().any(|q| q.oid == p.oid) {
                lfs.push(p);
            }
        }
        let url = format!("{}/{repo_id}.git/info/lfs/objects/batch", self.endpoint);
        let what = format!("cannot upload large files to {repo_id} at {}", self.endpoint);
        for chunk in lfs.chunks(CHUNK) {
            let objects: Vec<Value> = chunk.iter().map(|p| json!({"oid": p.oid, "size": p.size})).collect();
            // "multipart" is the Hub's own transfer for large files: parts PUT to the URLs it lists, then a
            // completion request. The Hub answers with it past a size, so it is offered along with "basic" (one PUT).
            let payload = json!({
                "operation": "upload",
                "transfers": ["basic", "multipart"],
                "objects": objects,
                "hash_algo": "sha256",
                "ref": {"name": REVISION},
            });
            let request = self.authorized(self.agent.post(&url)).set("Accept", LFS_CONTENT_TYPE);
            let body = payload.to_string();
            let answer: Value =
                self.send(&what, request.set("Content-Type", LFS_CONTENT_TYPE), Body::Text(&body))?.into_json()?;
            let objects = answer["objects"].as_array().with_context(|| format!("{what}: the answer has no objects"))?;
            let name_of = |oid: &str| {
                let names: Vec<&str> =
                    planned.iter().filter(|p| p.oid == oid).map(|p| p.upload.path_in_repo.as_str()).collect();
                if names.is_empty() {
                    format!("object {oid}")
                } else {
                    names.join(", ")
                }
            };
            let errors: Vec<String> = objects
                .iter()
                .filter(|o| !o["error"].is_null())
                .map(|o| {
                    let oid = o["oid"].as_str().unwrap_or_default();
                    let error = &o["error"];
                    format!("{}: {} (code {})", name_of(oid), error["message"].as_str().unwrap_or("?"), error["code"])
                })
                .collect();
            if !errors.is_empty() {
                bail!("{what}: the LFS batch API refused {}", errors.join("; "));
            }
            for object in objects {
                let oid = object["oid"].as_str().with_context(|| format!("{what}: an object without \"oid\""))?;
                let Some(p) = chunk.iter().find(|p| p.oid == oid) else {
                    bail!("{what}: the LFS batch API answered for object {oid}, which was not asked for");
                };
                let Some(actions) = object.get("actions").filter(|a| !a.is_null()) else {
                    tracing::info!("{}: the Hub has its content already", p.upload.path_in_repo);
                    continue;
                };
                let what = format!("cannot upload {} to {repo_id}", p.upload.path_in_repo);
                let upload = &actions["upload"];
                let href = self.href(upload).with_context(|| format!("{what}: no upload URL in the answer"))?;
                tracing::info!("uploading {} ({} bytes) to {repo_id}", p.upload.path_in_repo, p.size);
                match upload["header"].get("chunk_size") {
                    Some(chunk_size) => self.upload_parts(p, &upload["header"], chunk_size, &href, &what)?,
                    None => {
                        // A storage URL: no token (huggingface_hub sends none either).
                        let file = Body::File { path: &p.upload.local, start: 0, length: p.size };
                        self.send(&what, self.agent.put(&href), file)?;
                    }
                }
                if let Some(verify) = actions.get("verify").filter(|v| !v.is_null()) {
                    let href = self.href(verify).with_context(|| format!("{what}: no verify URL in the answer"))?;
                    let body = json!({"oid": p.oid, "size": p.size});
                    self.send(&what, self.authorized(self.agent.post(&href)), Body::Json(&body))?;
                }
            }
        }
        Ok(())
    }

    /// The multipart transfer: `header` maps part numbers ("00001", ...) to URLs, one per `chunk_size` bytes; each
    /// part is PUT, and the parts' etags are posted to `href` to complete the object.
    fn upload_parts(&self, p: &Planned, header: &Value, chunk_size: &Value, href: &str, what: &str) -> Result<()> {
        let chunk_size = match chunk_size {
            Value::String(s) => s.parse::<u64>().ok(),
            other => other.as_u64(),
        }
        .filter(|&c| c > 0)
        .with_context(|| format!("{what}: chunk_size {chunk_size} is no positive integer"))?;
        let mut parts: Vec<(u64, String)> = header
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(key, _)| !key.is_empty() && key.bytes().all(|b| b.is_ascii_digit()))
            .filter_map(|(key, url)| Some((key.parse().ok()?, self.fix_endpoint(url.as_str()?))))
            .collect();
        parts.sort();
        if parts.len() as u64 != p.size.div_ceil(chunk_size) {
            bail!("{what}: {} part URLs for {} bytes in parts of {chunk_size}", parts.len(), p.size);
        }
        let mut etags = Vec::new();
        for (index, (_, url)) in parts.iter().enumerate() {
            let start = index as u64 * chunk_size;
            let length = chunk_size.min(p.size - start);
            let part = Body::File { path: &p.upload.local, start, length };
            let response =
                self.send(&format!("{what} (part {} of {})", index + 1, parts.len()), self.agent.put(url), part)?;
            let etag = response.header("etag").filter(|e| !e.is_empty());
            let etag = etag.with_context(|| format!("{what}: no etag for part {}", index + 1))?;
            etags.push(json!({"partNumber": index + 1, "etag": etag}));
        }
        let body = json!({"oid": p.oid, "parts": etags}).to_string();
        let request = self.agent.post(href).set("Accept", LFS_CONTENT_TYPE).set("Content-Type", LFS_CONTENT_TYPE);
        self.send(what, request, Body::Text(&body))?;
        Ok(())
    }

    fn authorized(&self, request: ureq::Request) -> ureq::Request {
        request.set("Authorization", &format!("Bearer {}", self.token))
    }

    /// An action's `href`, on `HF_ENDPOINT` when the Hub answered with its default address (a proxy).
    fn href(&self, action: &Value) -> Option<String> {
        action["href"].as_str().map(|h| self.fix_endpoint(h))
    }

    fn fix_endpoint(&self, url: &str) -> String {
        url.replace(DEFAULT_ENDPOINT, &self.endpoint)
    }

    /// Sends `request` with `body`, again after 1, 2, 4 and 8 s when the connection failed or the server answered
    /// 429 or 5xx (huggingface_hub's `http_backoff`); errors name `what`.
    fn send(&self, what: &str, request: ureq::Request, body: Body) -> Result<ureq::Response> {
        let mut wait = Duration::from_secs(1);
        loop {
            let request = request.clone();
            let sent = match body {
                Body::Empty => request.call(),
                Body::Json(value) => request.send_json(value),
                Body::Text(text) => request.send_string(text),
                Body::File { path, start, length } => {
                    let read = || format!("{what}: cannot read {}", path.display());
                    let mut file = std::fs::File::open(path).with_context(read)?;
                    file.seek(SeekFrom::Start(start)).with_context(read)?;
                    // Storage wants the length up front (no chunked encoding).
                    request.set("Content-Length", &length.to_string()).send(file.take(length))
                }
            };
            match sent {
                Ok(response) => return Ok(response),
                Err(e) => {
                    let transient = match &e {
                        ureq::Error::Status(status, _) => matches!(status, 429 | 500 | 502 | 503 | 504),
                        ureq::Error::Transport(_) => true,
                    };
                    if !transient || wait > Duration::from_secs(8) {
                        return Err(http_error(what, e));
                    }
                    tracing::warn!("{what}: {e}; trying again in {}s", wait.as_secs());
                    std::thread::sleep(wait);
                    wait *= 2;
                }
            }
        }
    }
}

/// What a request sends.
#[derive(Clone, Copy)]
enum Body<'a> {
    Empty,
    Json(&'a Value),
    Text(&'a str),
    /// `length` bytes of a file from `start`
    File {
        path: &'a Path,
        start: u64,
        length: u64,
    },
}

/// `what` failed: the HTTP status and the Hub's message (its `X-Error-Message` header, else the body's `error`),
/// or the connection's error.
fn http_error(what: &str, error: ureq::Error) -> anyhow::Error {
    match error {
        ureq::Error::Status(status, response) => {
            let header = response.header("x-error-message").map(str::to_string);
            let body = response.into_string().unwrap_or_default();
            let message = header
                .or_else(|| {
                    let json: Value = serde_json::from_str(&body).ok()?;
                    match &json["error"] {
                        Value::String(s) => Some(s.clone()),
                        Value::Null => json["error_description"].as_str().map(str::to_string),
                        other => Some(other.to_string()),
                    }
                })
                .unwrap_or_else(|| body.chars().take(300).collect::<String>().trim().to_string());
            let hint = match status {
                401 => " (is the token valid?)",
                403 => " (does the token have write access to it?)",
                _ => "",
            };
            let message = if message.is_empty() { String::new() } else { format!(": {message}") };
            anyhow!("{what}: HTTP {status}{hint}{message}")
        }
        ureq::Error::Transport(transport) => anyhow!("{what}: {transport}"),
    }
}

/// The token `hf auth login` saves, if any.
fn token_file(home: &Path) -> Option<String> {
    let token = std::fs::read_to_string(home.join("token")).ok()?;
    Some(token.trim().to_string()).filter(|t| !t.is_empty())
}

/// A path segment as Python's `quote(revision, safe="")` writes it.
fn quote(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn size_and_sample(path: &Path) -> Result<(u64, Vec<u8>)> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let size = file.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
    let mut sample = Vec::with_capacity(512);
    file.take(512).read_to_end(&mut sample).with_context(|| format!("cannot read {}", path.display()))?;
    Ok((size, sample))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// `git hash-object`: the id the Hub gives a regular file.
pub fn git_blob_sha1(content: &[u8]) -> String {
    let mut hasher = sha1::Sha1::new();
    hasher.update(format!("blob {}\0", content.len()).as_bytes());
    hasher.update(content);
    format!("{:x}", hasher.finalize())
}

/// What a model card says about a run.
#[derive(Debug, Clone, Default)]
pub struct ModelCard {
    /// the repo's name without its namespace
    pub model_name: String,
    /// "org/name"
    pub hub_model_id: String,
    /// the model trained: its Hub id, or how a local one is named
    pub base_model: String,
    /// whether `base_model` is a Hub id (else it is named in the text only, not linked nor in the metadata)
    pub base_model_on_hub: bool,
    /// the training data: its Hub id, or how local data is named
    pub dataset: String,
    pub dataset_on_hub: bool,
    /// "DPO", "ORPO" or "CPO"
    pub trainer: String,
    /// a LoRA adapter (PEFT's card data) rather than a whole model
    pub adapter: bool,
    /// names and values, as transformers lists them under "Training hyperparameters"
    pub hyperparameters: Vec<(String, String)>,
    /// the last logged values
    pub results: Vec<(String, String)>,
}

/// TRL's trainer tag, paper title, arXiv id and BibTeX entry for `trainer`.
fn paper(trainer: &str) -> Option<(&'static str, &'static str, &'static str, &'static str)> {
    Some(match trainer {
        "DPO" => (
            "dpo",
            "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
            "2305.18290",
            "@inproceedings{rafailov2023direct,
    title        = {{Direct Preference Optimization: Your Language Model is Secretly a Reward Model}},
    author       = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and Stefano Ermon and Chelsea Finn},
    year         = 2023,
    booktitle    = {Advances in Neural Information Processing Systems 36: Annual Conference on Neural Information Processing Systems 2023, NeurIPS 2023, New Orleans, LA, USA, December 10 - 16, 2023},
    url          = {http://papers.nips.cc/paper_files/paper/2023/hash/a85b405ed65c6477a4fe8302b5e06ce7-Abstract-Conference.html},
    editor       = {Alice Oh and Tristan Naumann and Amir Globerson and Kate Saenko and Moritz Hardt and Sergey Levine},
}",
        ),
        "ORPO" => (
            "orpo",
            "ORPO: Monolithic Preference Optimization without Reference Model",
            "2403.07691",
            "@article{hong2024orpo,
    title        = {{ORPO: Monolithic Preference Optimization without Reference Model}},
    author       = {Jiwoo Hong and Noah Lee and James Thorne},
    year         = 2024,
    eprint       = {arXiv:2403.07691}
}",
        ),
        "CPO" => (
            "cpo",
            "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine Translation",
            "2401.08417",
            "@inproceedings{xu2024contrastive,
    title        = {{Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine Translation}},
    author       = {Haoran Xu and Amr Sharaf and Yunmo Chen and Weiting Tan and Lingfeng Shen and Benjamin Van Durme and Kenton Murray and Young Jin Kim},
    year         = 2024,
    booktitle    = {Forty-first International Conference on Machine Learning, {ICML} 2024, Vienna, Austria, July 21-27, 2024},
    publisher    = {OpenReview.net},
    url          = {https://openreview.net/forum?id=51iwkioZpn}
}",
        ),
        _ => return None,
    })
}

/// TRL's quick start, `{id}` standing for the repo.
const QUICK_START: &str = r#"```python
from transformers import pipeline

question = "If you had a time machine, but could only go to the past or the future once and never return, which would you choose and why?"
generator = pipeline("text-generation", model="{id}", device_map="auto")
output = generator([{"role": "user", "content": question}], max_new_tokens=128, return_full_text=False)[0]
print(output["generated_text"])
```
"#;

/// An adapter's: PEFT loads its base model too.
const ADAPTER_QUICK_START: &str = r#"```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{id}")
tokenizer = AutoTokenizer.from_pretrained("{id}")
```
"#;

const TRL_CITATION: &str = "@software{vonwerra2020trl,
  title   = {{TRL: Transformers Reinforcement Learning}},
  author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
  license = {Apache-2.0},
  url     = {https://github.com/huggingface/trl},
  year    = {2020}
}";

/// The README.md of a pushed model: TRL's model card (`trl/templates/lm_model_card.md`: YAML metadata with the base
/// model, datasets, library and tags; the base model and data, a quick start, the method and its citation), with
/// transformers' lists of hyperparameters and results, and prefalign's version. An adapter's card carries PEFT's
/// metadata (`library_name: peft`, its tags, `pipeline_tag`).
pub fn model_card(card: &ModelCard) -> String {
    let paper = paper(&card.trainer);
    let mut tags: Vec<String> = vec!["generated_from_trainer".into(), "trl".into()];
    tags.extend(paper.map(|(tag, ..)| tag.to_string()));
    tags.push("prefalign".into());
    let mut data = Map::new();
    if card.base_model_on_hub {
        data.insert("base_model".into(), card.base_model.clone().into());
    }
    if card.dataset_on_hub {
        data.insert("datasets".into(), card.dataset.clone().into());
    }
    data.insert("library_name".into(), if card.adapter { "peft" } else { "transformers" }.into());
    data.insert("model_name".into(), card.model_name.clone().into());
    if card.adapter {
        // PEFT's create_or_update_model_card: the model's tags with its own, sorted
        tags.retain(|t| t != "generated_from_trainer");
        tags.extend(["lora".to_string(), "transformers".to_string()]);
        if card.base_model_on_hub {
            tags.push(format!("base_model:adapter:{}", card.base_model));
        }
        tags.sort();
        data.insert("pipeline_tag".into(), "text-generation".into());
    }
    data.insert("tags".into(), tags.into());
    let yaml = serde_norway::to_string(&data).expect("strings serialize");

    let link = |on_hub: bool, id: &str, kind: &str| {
        if on_hub {
            format!("[{id}](https://huggingface.co/{kind}{id})")
        } else {
            format!("`{id}`")
        }
    };
    let mut out = format!("---\n{yaml}---\n\n# Model Card for {}\n\n", card.model_name);
    out += &format!(
        "This model is a fine-tuned version of {} on the {} dataset.\n",
        link(card.base_model_on_hub, &card.base_model, ""),
        link(card.dataset_on_hub, &card.dataset, "datasets/")
    );
    let what = if card.adapter { "This LoRA adapter" } else { "It" };
    out += &format!(
        "{what} has been trained with prefalign {}, which follows [TRL](https://github.com/huggingface/trl)'s \
         {}Trainer.\n",
        env!("CARGO_PKG_VERSION"),
        card.trainer
    );
    let quick_start = if card.adapter { ADAPTER_QUICK_START } else { QUICK_START };
    out += &format!("\n## Quick start\n\n{}", quick_start.replace("{id}", &card.hub_model_id));
    out += "\n## Training procedure\n\n";
    match paper {
        Some((_, title, id, _)) => {
            out += &format!(
            "This model was trained with {}, a method introduced in [{title}](https://huggingface.co/papers/{id}).\n",
            card.trainer
        )
        }
        None => out += &format!("This model was trained with {}.\n", card.trainer),
    }
    let list = |items: &[(String, String)]| items.iter().map(|(k, v)| format!("- {k}: {v}\n")).collect::<String>();
    if !card.hyperparameters.is_empty() {
        out += "\n### Training hyperparameters\n\nThe following hyperparameters were used during training:\n";
        out += &list(&card.hyperparameters);
    }
    if !card.results.is_empty() {
        out += "\n### Training results\n\n";
        out += &list(&card.results);
    }
    out += &format!("\n### Framework versions\n\n- prefalign: {}\n", env!("CARGO_PKG_VERSION"));
    out += "\n## Citations\n\n";
    if let Some((_, _, _, citation)) = paper {
        out += &format!("Cite {} as:\n\n```bibtex\n{citation}\n```\n\n", card.trainer);
    }
    out += &format!("Cite TRL as:\n\n```bibtex\n{TRL_CITATION}\n```\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_blob_ids_are_gits() {
        // huggingface_hub's docstring example of git_hash
        assert_eq!(git_blob_sha1(b"Hello, World!"), "b45ef6fec89518d314f546fd6c3025367b721684");
        assert_eq!(quote("refs/pr/1"), "refs%2Fpr%2F1");
    }

    #[test]
    fn model_card_has_trls_metadata_and_the_run() {
        let card = ModelCard {
            model_name: "tiny-dpo".into(),
            hub_model_id: "org/tiny-dpo".into(),
            base_model: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
            base_model_on_hub: true,
            dataset: "trl-lib/ultrafeedback_binarized".into(),
            dataset_on_hub: true,
            trainer: "DPO".into(),
            adapter: false,
            hyperparameters: vec![("learning_rate".into(), "5e-07".into()), ("beta".into(), "0.1".into())],
            results: vec![("loss".into(), "0.6931".into())],
        };
        let text = model_card(&card);
        assert!(text.starts_with(
            "---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\ndatasets: trl-lib/ultrafeedback_binarized\n\
             library_name: transformers\nmodel_name: tiny-dpo\ntags:\n- generated_from_trainer\n- trl\n- dpo\n\
             - prefalign\n---\n\n# Model Card for tiny-dpo\n\n\
             This model is a fine-tuned version of [HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct) \
             on the [trl-lib/ultrafeedback_binarized](https://huggingface.co/datasets/trl-lib/ultrafeedback_binarized) dataset.\n"
        ), "{text}");
        assert!(text.contains("model=\"org/tiny-dpo\""), "{text}");
        assert!(text.contains(
            "[Direct Preference Optimization: Your Language Model is Secretly a Reward Model]\
             (https://huggingface.co/papers/2305.18290)"
        ));
        assert!(text.contains("- learning_rate: 5e-07\n- beta: 0.1\n"), "{text}");
        assert!(text.contains("### Training results\n\n- loss: 0.6931\n"), "{text}");
        assert!(text.contains(&format!("- prefalign: {}", env!("CARGO_PKG_VERSION"))), "{text}");
        assert!(text.contains("@inproceedings{rafailov2023direct,") && text.contains("@software{vonwerra2020trl,"));

        let local = ModelCard {
            base_model: "/data/my model".into(),
            base_model_on_hub: false,
            dataset: "pairs.jsonl".into(),
            dataset_on_hub: false,
            trainer: "ORPO".into(),
            adapter: true,
            ..card
        };
        let text = model_card(&local);
        let metadata = "---\nlibrary_name: peft\nmodel_name: tiny-dpo\npipeline_tag: text-generation\n\
                        tags:\n- lora\n- orpo\n- prefalign\n- transformers\n- trl\n---\n";
        assert!(text.starts_with(metadata), "{text}");
        assert!(text.contains("fine-tuned version of `/data/my model` on the `pairs.jsonl` dataset"), "{text}");
        assert!(text.contains("AutoPeftModelForCausalLM.from_pretrained(\"org/tiny-dpo\")"), "{text}");
        let adapter_of_hub_model = ModelCard { base_model_on_hub: true, ..local };
        let text = model_card(&adapter_of_hub_model);
        assert!(text.contains("---\nbase_model: /data/my model\nlibrary_name: peft\n"), "{text}");
        assert!(text.contains("\n- base_model:adapter:/data/my model\n- lora\n"), "{text}");
    }
}

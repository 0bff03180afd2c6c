//! Attachments for `ask_with_attachment`: a local file, base64 data, or a URL, turned into an
//! OpenAI content part (`image_url` for images, `file` for PDF, audio, video and the rest).
//!
//! - `attachment_path` is read from disk. Over stdio any file the process can read is allowed
//!   (the user runs it on their own machine); over HTTP only files inside `mcp.attachment_roots`,
//!   after resolving `..` and symlinks, and checking the file actually opened.
//! - `attachment_url` is passed to Poe as is. The gateway never fetches it.
//! - `attachment_base64` (plain base64 or a `data:` URL) is decoded to check its size and type.
//!
//! Sizes are capped by `mcp.max_attachment_bytes`; the MIME type comes from the content's magic
//! bytes, then the caller's `mime_type`, then the file extension.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use serde_json::{Value, json};

use super::Access;
use crate::config::McpPolicy;

/// What `attachment_path` may read, and how much.
#[derive(Debug, Clone)]
pub struct AttachmentPolicy {
    roots: Vec<PathBuf>,
    max_bytes: u64,
}

impl AttachmentPolicy {
    pub fn new(policy: &McpPolicy) -> AttachmentPolicy {
        AttachmentPolicy {
            roots: policy.attachment_roots.clone(),
            max_bytes: policy.max_attachment_bytes.0,
        }
    }
}

/// The attachment arguments of a tool call.
#[derive(Debug, Default, Clone, Copy)]
pub struct Spec<'a> {
    pub path: Option<&'a str>,
    pub url: Option<&'a str>,
    pub base64: Option<&'a str>,
    pub mime_type: Option<&'a str>,
    pub filename: Option<&'a str>,
}

/// A loaded attachment, ready to become a content part.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub name: String,
    pub mime: Option<String>,
    /// Decoded size; `None` for a URL (never fetched).
    pub size: Option<u64>,
    data: Data,
}

#[derive(Debug, Clone)]
enum Data {
    Inline(Vec<u8>),
    Url(String),
}

impl Attachment {
    pub fn is_image(&self) -> bool {
        self.mime
            .as_deref()
            .is_some_and(|m| m.starts_with("image/"))
    }

    /// The OpenAI content part Poe expects for this attachment.
    pub fn content_part(&self) -> Value {
        let url = match &self.data {
            Data::Inline(bytes) => {
                let mime = self.mime.as_deref().unwrap_or("application/octet-stream");
                let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
                format!("data:{mime};base64,{b64}")
            }
            Data::Url(u) => u.clone(),
        };
        if self.is_image() {
            json!({"type": "image_url", "image_url": {"url": url}})
        } else {
            json!({"type": "file", "file": {"filename": self.name, "file_data": url}})
        }
    }
}

/// Loads the one attachment `spec` names. Errors are messages for the caller.
pub async fn load(
    spec: Spec<'_>,
    policy: &AttachmentPolicy,
    access: Access,
) -> Result<Attachment, String> {
    // A blank `filename` (agents fill optional fields with "") means none was given.
    let spec = Spec {
        filename: spec.filename.filter(|f| !f.trim().is_empty()),
        ..spec
    };
    let given = [
        spec.path.is_some(),
        spec.url.is_some(),
        spec.base64.is_some(),
    ]
    .iter()
    .filter(|g| **g)
    .count();
    if given != 1 {
        return Err(
            "give exactly one of attachment_path, attachment_url or attachment_base64".into(),
        );
    }
    let declared = match spec.mime_type.map(str::trim).filter(|m| !m.is_empty()) {
        Some(m) if valid_mime(m) => Some(m.to_ascii_lowercase()),
        Some(m) => {
            return Err(format!(
                "mime_type {m:?} is not a MIME type such as `image/png`"
            ));
        }
        None => None,
    };
    if let Some(url) = spec.url {
        return from_url(url, declared, spec.filename);
    }
    if let Some(b64) = spec.base64 {
        return from_base64(b64, declared, spec.filename, policy.max_bytes);
    }
    let raw = spec.path.unwrap_or_default().to_string();
    let policy = policy.clone();
    let (path, bytes) = tokio::task::spawn_blocking(move || read_path(&raw, access, &policy))
        .await
        .map_err(|e| format!("reading the attachment failed: {e}"))??;
    let name = spec
        .filename
        .map(str::to_string)
        .or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "attachment".into());
    let mime = detect(&bytes, declared, &name);
    Ok(Attachment {
        name,
        mime,
        size: Some(bytes.len() as u64),
        data: Data::Inline(bytes),
    })
}

fn from_url(
    url: &str,
    declared: Option<String>,
    filename: Option<&str>,
) -> Result<Attachment, String> {
    let url = url.trim();
    let ok = url
        .parse::<http::Uri>()
        .ok()
        .is_some_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
    if !ok {
        return Err(format!(
            "attachment_url {:?} is not an http(s) URL; send local data as attachment_base64",
            url.chars().take(100).collect::<String>()
        ));
    }
    let name = filename
        .map(str::to_string)
        .or_else(|| url_file_name(url))
        .unwrap_or_else(|| "attachment".into());
    let mime = declared
        .or_else(|| mime_from_name(&name).map(str::to_string))
        .or_else(|| poe_image_url(url).then(|| "image/*".to_string()));
    Ok(Attachment {
        name,
        mime,
        size: None,
        data: Data::Url(url.to_string()),
    })
}

fn from_base64(
    input: &str,
    mut declared: Option<String>,
    filename: Option<&str>,
    max: u64,
) -> Result<Attachment, String> {
    let mut b64 = input.trim();
    if let Some(rest) = b64.strip_prefix("data:") {
        let (head, data) = rest
            .split_once(',')
            .ok_or("attachment_base64 starts like a data: URL but has no `,`")?;
        let mime = head
            .strip_suffix(";base64")
            .ok_or("attachment_base64 is a data: URL without `;base64`; send base64 data")?;
        if declared.is_none() && valid_mime(mime) {
            declared = Some(mime.to_ascii_lowercase());
        }
        b64 = data;
    }
    let cleaned: Vec<u8> = b64.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if cleaned.is_empty() {
        return Err("attachment_base64 is empty".into());
    }
    if (cleaned.len() as u64 / 4).saturating_mul(3) > max.saturating_add(3) {
        return Err(too_large(cleaned.len() as u64 / 4 * 3, max));
    }
    let bytes = decode_base64(&cleaned)
        .ok_or("attachment_base64 is not valid base64 (standard or URL-safe alphabet)")?;
    if bytes.len() as u64 > max {
        return Err(too_large(bytes.len() as u64, max));
    }
    let mime = detect(&bytes, declared, filename.unwrap_or_default());
    let name = filename.map(str::to_string).unwrap_or_else(|| {
        let ext = mime.as_deref().and_then(ext_from_mime).unwrap_or("bin");
        format!("attachment.{ext}")
    });
    Ok(Attachment {
        name,
        mime,
        size: Some(bytes.len() as u64),
        data: Data::Inline(bytes),
    })
}

fn decode_base64(data: &[u8]) -> Option<Vec<u8>> {
    use base64::engine::DecodePaddingMode;
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    let lenient =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    [
        GeneralPurpose::new(&base64::alphabet::STANDARD, lenient),
        GeneralPurpose::new(&base64::alphabet::URL_SAFE, lenient),
    ]
    .iter()
    .find_map(|engine| engine.decode(data).ok())
}

fn too_large(size: u64, max: u64) -> String {
    format!(
        "the attachment is {} bytes, over this gateway's limit of {max} bytes (mcp.max_attachment_bytes)",
        size
    )
}

/// Resolves and reads `raw` under the rules of `access`.
fn read_path(
    raw: &str,
    access: Access,
    policy: &AttachmentPolicy,
) -> Result<(PathBuf, Vec<u8>), String> {
    if raw.trim().is_empty() {
        return Err("attachment_path is empty".into());
    }
    let resolved = match access {
        Access::Local => std::fs::canonicalize(expand_home(raw)).map_err(|e| io_error(raw, &e))?,
        Access::Remote => resolve_in_roots(raw, &policy.roots)?,
    };
    // The kernel's own files: `/proc/self/environ` is a "regular file" holding this
    // process's environment, keys included, and nothing there is a user's attachment.
    if KERNEL_DIRS.iter().any(|d| resolved.starts_with(d)) {
        return Err(format!(
            "attachment_path {raw:?} is a system file (under /proc, /sys or /dev), not an attachment"
        ));
    }
    let file = open_without_blocking(&resolved).map_err(|e| io_error(raw, &e))?;
    let meta = file.metadata().map_err(|e| io_error(raw, &e))?;
    if !meta.is_file() {
        return Err(format!("attachment_path {raw:?} is not a regular file"));
    }
    if meta.len() > policy.max_bytes {
        return Err(too_large(meta.len(), policy.max_bytes));
    }
    if access == Access::Remote {
        check_opened_file(&file, raw, &policy.roots)?;
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(policy.max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(raw, &e))?;
    if bytes.len() as u64 > policy.max_bytes {
        return Err(too_large(bytes.len() as u64, policy.max_bytes));
    }
    Ok((resolved, bytes))
}

/// Where the kernel's pseudo-files live (checked on the resolved path).
const KERNEL_DIRS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Opens for reading without waiting on a FIFO that has no writer (which would hold a
/// blocking thread for good); a regular file reads the same either way, and anything that
/// is not one is refused right after.
fn open_without_blocking(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    options.open(path)
}

/// `~/x` is the user's home, as a shell would have it (local access only).
fn expand_home(raw: &str) -> PathBuf {
    match (raw.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(raw),
    }
}

fn io_error(raw: &str, e: &std::io::Error) -> String {
    let why = match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    };
    format!("cannot read attachment_path {raw:?}: {why}")
}

fn outside_roots(raw: &str) -> String {
    format!(
        "attachment_path {raw:?} is outside the directories this gateway lets HTTP clients read \
         (mcp.attachment_roots); send the file as attachment_base64 instead"
    )
}

/// Over HTTP: the path (absolute, or relative to a root) must lie inside a root both as
/// written and once `..` and symlinks are resolved. The written form is checked first, so an
/// error never tells whether a file outside the roots exists.
fn resolve_in_roots(raw: &str, roots: &[PathBuf]) -> Result<PathBuf, String> {
    if roots.is_empty() {
        return Err(
            "attachment_path is not available over HTTP on this gateway (no mcp.attachment_roots \
             are configured); send the file as attachment_base64 or attachment_url instead"
                .into(),
        );
    }
    let path = Path::new(raw);
    let candidates: Vec<PathBuf> = if path.is_absolute() {
        vec![path.to_path_buf()]
    } else {
        roots.iter().map(|r| r.join(path)).collect()
    };
    let lexical_roots: Vec<PathBuf> = roots.iter().filter_map(|r| normalize(r)).collect();
    let real_roots: Vec<PathBuf> = roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    let mut last_err = None;
    for candidate in candidates {
        let Some(lexical) = normalize(&candidate) else {
            return Err(outside_roots(raw));
        };
        if !lexical_roots.iter().any(|r| lexical.starts_with(r)) {
            return Err(outside_roots(raw));
        }
        match std::fs::canonicalize(&lexical) {
            Ok(real) if real_roots.iter().any(|r| real.starts_with(r)) => return Ok(real),
            Ok(_) => return Err(outside_roots(raw)),
            // Missing: say so only if where it would be is inside a root. Through a symlink
            // that leads out, "no such file" against "outside" would tell what exists there.
            Err(e) => {
                // A link on the way whose target is missing leads who knows where: that it
                // is missing would tell what does not exist there.
                if lexical
                    .ancestors()
                    .any(|a| a.symlink_metadata().is_ok() && std::fs::canonicalize(a).is_err())
                {
                    return Err(outside_roots(raw));
                }
                let found = lexical
                    .ancestors()
                    .skip(1)
                    .find_map(|a| std::fs::canonicalize(a).ok());
                if !found.is_some_and(|real| real_roots.iter().any(|r| real.starts_with(r))) {
                    return Err(outside_roots(raw));
                }
                last_err = Some(io_error(raw, &e));
            }
        }
    }
    Err(last_err.unwrap_or_else(|| outside_roots(raw)))
}

/// `..` and `.` removed without touching the disk; `None` if `..` climbs above the root.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => out.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() || out.as_os_str().is_empty() {
                    return None;
                }
            }
            Component::Normal(p) => out.push(p),
        }
    }
    Some(out)
}

/// The file actually opened must be inside a root: this closes the gap between resolving the
/// path and opening it (a component swapped for a symlink in between).
#[cfg(target_os = "linux")]
fn check_opened_file(file: &std::fs::File, raw: &str, roots: &[PathBuf]) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| io_error(raw, &e))?;
    let inside = roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .any(|r| real.starts_with(r));
    if inside {
        Ok(())
    } else {
        Err(outside_roots(raw))
    }
}

#[cfg(not(target_os = "linux"))]
fn check_opened_file(_file: &std::fs::File, _raw: &str, _roots: &[PathBuf]) -> Result<(), String> {
    Ok(())
}

/// Magic bytes first, then the caller's word, then the name's extension, then plain text.
fn detect(bytes: &[u8], declared: Option<String>, name: &str) -> Option<String> {
    if let Some(kind) = infer::get(bytes) {
        return Some(kind.mime_type().to_string());
    }
    declared
        .or_else(|| mime_from_name(name).map(str::to_string))
        .or_else(|| {
            std::str::from_utf8(bytes)
                .is_ok()
                .then(|| "text/plain".to_string())
        })
}

fn valid_mime(m: &str) -> bool {
    let Some((top, sub)) = m.split_once('/') else {
        return false;
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    token(top) && token(sub)
}

const MIME_BY_EXT: &[(&str, &str)] = &[
    ("png", "image/png"),
    ("jpg", "image/jpeg"),
    ("jpeg", "image/jpeg"),
    ("gif", "image/gif"),
    ("webp", "image/webp"),
    ("bmp", "image/bmp"),
    ("heic", "image/heic"),
    ("heif", "image/heif"),
    ("svg", "image/svg+xml"),
    ("pdf", "application/pdf"),
    ("mp3", "audio/mpeg"),
    ("wav", "audio/wav"),
    ("m4a", "audio/mp4"),
    ("ogg", "audio/ogg"),
    ("flac", "audio/flac"),
    ("aac", "audio/aac"),
    ("mp4", "video/mp4"),
    ("mov", "video/quicktime"),
    ("webm", "video/webm"),
    ("mkv", "video/x-matroska"),
    ("avi", "video/x-msvideo"),
    ("txt", "text/plain"),
    ("md", "text/markdown"),
    ("csv", "text/csv"),
    ("json", "application/json"),
    ("html", "text/html"),
    ("xml", "application/xml"),
    (
        "docx",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ),
    (
        "xlsx",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ),
    (
        "pptx",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ),
];

/// The MIME type for a file name's extension, when it is a common one.
pub(crate) fn mime_from_name(name: &str) -> Option<&'static str> {
    let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
    MIME_BY_EXT.iter().find(|(e, _)| *e == ext).map(|(_, m)| *m)
}

fn ext_from_mime(mime: &str) -> Option<&'static str> {
    MIME_BY_EXT
        .iter()
        .find(|(_, m)| *m == mime)
        .map(|(e, _)| *e)
}

/// Whether `url` is one of Poe's own image URLs (`https://pfst.cf2.poecdn.net/base/image/<hash>`,
/// what `generate_image` returns), whose names carry no extension. For a URL only the part's
/// kind is sent, so `image/*` stands for the type Poe knows.
fn poe_image_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    let poe = uri.host().is_some_and(|h| {
        h.eq_ignore_ascii_case("poecdn.net") || h.to_ascii_lowercase().ends_with(".poecdn.net")
    });
    poe && uri.path().split('/').any(|s| s == "image")
}

/// The last path segment of a URL, without its query.
pub(crate) fn url_file_name(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next()?;
    let after_host = path.split_once("://").map_or(path, |(_, rest)| rest);
    let (_, path) = after_host.split_once('/')?;
    let last = path.rsplit('/').next()?;
    (!last.is_empty()).then(|| {
        percent_encoding::percent_decode_str(last)
            .decode_utf8_lossy()
            .into_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG: &[u8] =
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";

    fn policy(roots: Vec<PathBuf>, max: u64) -> AttachmentPolicy {
        AttachmentPolicy {
            roots,
            max_bytes: max,
        }
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("poe-gw-att-{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn base64_images_become_image_url_parts() {
        let b64 = base64::engine::general_purpose::STANDARD.encode(PNG);
        let a = load(
            Spec {
                base64: Some(&b64),
                ..Spec::default()
            },
            &policy(vec![], 1024),
            Access::Remote,
        )
        .await
        .unwrap();
        assert_eq!(a.mime.as_deref(), Some("image/png"));
        let part = a.content_part();
        assert_eq!(part["type"], "image_url");
        assert!(
            part["image_url"]["url"]
                .as_str()
                .unwrap()
                .starts_with("data:image/png;base64,iVBOR")
        );

        // A data: URL works too, and a PDF goes as a file part.
        let pdf = format!(
            "data:application/pdf;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(b"%PDF-1.7\n...")
        );
        let a = load(
            Spec {
                base64: Some(&pdf),
                filename: Some("report.pdf"),
                ..Spec::default()
            },
            &policy(vec![], 1024),
            Access::Remote,
        )
        .await
        .unwrap();
        let part = a.content_part();
        assert_eq!(part["type"], "file");
        assert_eq!(part["file"]["filename"], "report.pdf");
        assert!(
            part["file"]["file_data"]
                .as_str()
                .unwrap()
                .starts_with("data:application/pdf;base64,")
        );
    }

    // Found by the `mcp_args` fuzz target (fuzz/): a blank filename was sent to Poe as is.
    #[tokio::test]
    async fn a_blank_filename_counts_as_none() {
        for (spec, want) in [
            (
                Spec {
                    base64: Some("JVBERi0xLjcK"),
                    filename: Some(""),
                    ..Spec::default()
                },
                "attachment.pdf",
            ),
            (
                Spec {
                    url: Some("https://example.com/a/report.pdf"),
                    filename: Some(" "),
                    ..Spec::default()
                },
                "report.pdf",
            ),
        ] {
            let a = load(spec, &policy(vec![], 1024), Access::Remote)
                .await
                .unwrap();
            assert_eq!(a.name, want);
            assert_eq!(a.content_part()["file"]["filename"], want);
        }
    }

    #[tokio::test]
    async fn limits_and_shapes_are_enforced() {
        let p = policy(vec![], 8);
        let e = load(Spec::default(), &p, Access::Local).await.unwrap_err();
        assert!(e.contains("exactly one"), "{e}");
        let big = base64::engine::general_purpose::STANDARD.encode([0u8; 64]);
        let e = load(
            Spec {
                base64: Some(&big),
                ..Spec::default()
            },
            &p,
            Access::Local,
        )
        .await
        .unwrap_err();
        assert!(e.contains("max_attachment_bytes"), "{e}");
        let e = load(
            Spec {
                base64: Some("***"),
                ..Spec::default()
            },
            &p,
            Access::Local,
        )
        .await
        .unwrap_err();
        assert!(e.contains("not valid base64"), "{e}");
        let e = load(
            Spec {
                url: Some("file:///etc/passwd"),
                ..Spec::default()
            },
            &p,
            Access::Local,
        )
        .await
        .unwrap_err();
        assert!(e.contains("not an http(s) URL"), "{e}");
        let a = load(
            Spec {
                url: Some("https://example.com/cat.JPG?x=1"),
                ..Spec::default()
            },
            &p,
            Access::Remote,
        )
        .await
        .unwrap();
        assert_eq!(
            a.content_part(),
            json!({"type": "image_url", "image_url": {"url": "https://example.com/cat.JPG?x=1"}})
        );
    }

    #[tokio::test]
    async fn remote_paths_stay_inside_roots() {
        let root = tmpdir("root");
        let outside = tmpdir("outside");
        std::fs::write(root.join("ok.png"), PNG).unwrap();
        std::fs::write(outside.join("secret.txt"), b"secret").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(outside.join("secret.txt"), root.join("link.txt")).unwrap();
        let p = policy(vec![root.clone()], 1 << 20);
        let spec = |path: &str| Spec {
            path: Some(Box::leak(path.to_string().into_boxed_str())),
            ..Spec::default()
        };

        let a = load(
            spec(root.join("ok.png").to_str().unwrap()),
            &p,
            Access::Remote,
        )
        .await
        .unwrap();
        assert_eq!(a.name, "ok.png");
        assert!(a.is_image());
        // Relative to a root.
        assert!(load(spec("ok.png"), &p, Access::Remote).await.is_ok());

        let escapes = [
            outside.join("secret.txt").to_str().unwrap().to_string(),
            format!(
                "{}/../{}/secret.txt",
                root.display(),
                outside.file_name().unwrap().to_str().unwrap()
            ),
            "../../../../etc/passwd".to_string(),
            root.join("link.txt").to_str().unwrap().to_string(),
        ];
        for path in &escapes {
            let e = load(spec(path), &p, Access::Remote).await.unwrap_err();
            assert!(e.contains("outside"), "{path}: {e}");
        }
        // Missing inside the root: a plain "no such file".
        let e = load(spec("nope.png"), &p, Access::Remote)
            .await
            .unwrap_err();
        assert!(e.contains("no such file"), "{e}");
        // No roots: refused over HTTP, allowed locally.
        let none = policy(vec![], 1 << 20);
        let e = load(
            spec(root.join("ok.png").to_str().unwrap()),
            &none,
            Access::Remote,
        )
        .await
        .unwrap_err();
        assert!(e.contains("not available over HTTP"), "{e}");
        assert!(
            load(
                spec(outside.join("secret.txt").to_str().unwrap()),
                &none,
                Access::Local
            )
            .await
            .is_ok()
        );
        // A directory is not a file.
        let e = load(spec(root.to_str().unwrap()), &p, Access::Remote)
            .await
            .unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&outside);
    }

    #[test]
    fn names_and_types() {
        assert_eq!(mime_from_name("a.PDF"), Some("application/pdf"));
        assert_eq!(
            url_file_name("https://h/x/y%20z.mp4?a=b").as_deref(),
            Some("y z.mp4")
        );
        assert_eq!(url_file_name("https://h/"), None);
        assert!(valid_mime("image/png") && !valid_mime("png") && !valid_mime("a/b c"));
        assert_eq!(detect(b"hello", None, "notes"), Some("text/plain".into()));
        assert_eq!(detect(b"\xff\xfe\x00", None, "blob"), None);
    }
}

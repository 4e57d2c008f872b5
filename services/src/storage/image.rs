//! What an image is, decided without running anything: the parts of `qemu-img info
//! --output=json` the service uses, the format an image's first bytes show, the rules of a
//! backing chain, and the `json:` specs and `create` arguments that open or make an image
//! exactly as recorded.
//!
//! Everything here is a function of its arguments (bytes, records, the root's path): no file
//! is opened and no process runs, so the tests below drive it directly.

use std::ffi::OsString;
use std::path::{Component, Path};

use serde::Deserialize;

use super::index::Record;
use super::process::TOOL;
use super::root::check_name;
use super::{Format, SnapshotInfo, StorageError};
use crate::storage::Size;

/// Longest backing chain followed.
pub(super) const MAX_CHAIN: usize = 16;
/// Bytes of a qcow2 header read at adoption (version 3 header up to its incompatible features).
pub(super) const QCOW2_HEADER: usize = 104;
/// Largest size accepted (2^60 bytes, 1 EiB).
pub(super) const MAX_SIZE: u64 = 1 << 60;

/// The pieces of an image's `qemu-img` spec: name and record, top first.
pub(super) type Chain = Vec<(String, Record)>;

/// `qemu-img info --output=json`, the parts used.
#[derive(Debug, Deserialize)]
pub(super) struct ImageJson {
    pub(super) format: String,
    #[serde(rename = "virtual-size")]
    pub(super) virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    pub(super) actual_size: Option<u64>,
    #[serde(rename = "backing-filename", default)]
    pub(super) backing_filename: Option<String>,
    #[serde(rename = "backing-filename-format", default)]
    pub(super) backing_format: Option<String>,
    #[serde(default)]
    pub(super) snapshots: Vec<SnapshotJson>,
    #[serde(rename = "format-specific", default)]
    format_specific: Option<FormatSpecificJson>,
}

#[derive(Debug, Deserialize)]
struct FormatSpecificJson {
    #[serde(default)]
    data: Option<FormatDataJson>,
}

#[derive(Debug, Deserialize)]
struct FormatDataJson {
    #[serde(rename = "data-file", default)]
    data_file: Option<String>,
}

impl ImageJson {
    /// The external data file the image names, if any.
    pub(super) fn data_file(&self) -> Option<&str> {
        self.format_specific.as_ref().and_then(|f| f.data.as_ref()).and_then(|d| d.data_file.as_deref())
    }

    /// How many snapshots it lists, as recorded (saturating).
    pub(super) fn snapshot_count(&self) -> u32 {
        u32::try_from(self.snapshots.len()).unwrap_or(u32::MAX)
    }

    /// A ToolFailed unless qemu-img reports the `format` it was told to open `name` as.
    pub(super) fn check_format(&self, name: &str, format: Format) -> Result<(), StorageError> {
        if self.format == format.as_str() {
            return Ok(());
        }
        Err(StorageError::ToolFailed {
            tool: TOOL.into(),
            status: "exit status: 0".into(),
            message: format!(
                "asked for {} of {name:?}, it reports format {:?}",
                format.as_str(),
                self.format
            ),
        })
    }
}

/// One entry of info's `snapshots`.
#[derive(Debug, Deserialize)]
pub(super) struct SnapshotJson {
    pub(super) name: String,
    id: String,
    #[serde(rename = "date-sec", default)]
    date_sec: u64,
    #[serde(rename = "vm-state-size", default)]
    vm_state_size: u64,
}

impl SnapshotJson {
    /// What the service says about it.
    pub(super) fn to_info(&self) -> SnapshotInfo {
        SnapshotInfo {
            name: self.name.clone(),
            id: self.id.clone(),
            date: self.date_sec,
            vm_state_size: self.vm_state_size,
        }
    }
}

/// `qemu-img info --output=json` of `name` (bounded by the process that read it), parsed;
/// ToolFailed if it does not parse.
pub(super) fn read_info(name: &str, out: &[u8]) -> Result<ImageJson, StorageError> {
    parse_info(out).map_err(|e| StorageError::ToolFailed {
        tool: TOOL.into(),
        status: "exit status: 0".into(),
        message: format!("unexpected `info --output=json` output for {name:?}: {e}"),
    })
}

fn parse_info(out: &[u8]) -> Result<ImageJson, serde_json::Error> {
    serde_json::from_slice(out)
}

/// Checks a size: a multiple of 512, not zero, at most 2^60.
pub(super) fn check_size(size: Size) -> Result<(), StorageError> {
    let reason = if size.bytes() == 0 {
        "zero".to_owned()
    } else if size.bytes() % 512 != 0 {
        format!("{} bytes is not a multiple of 512", size.bytes())
    } else if size.bytes() > MAX_SIZE {
        format!("{} bytes is more than 2^60", size.bytes())
    } else {
        return Ok(());
    };
    Err(StorageError::InvalidSize { reason })
}

/// Whether a qcow2 header (version 3) sets the incompatible feature "external data file".
fn qcow2_has_data_file(head: &[u8]) -> bool {
    match head.get(4..8).zip(head.get(72..80)) {
        Some((version, features)) => {
            version == [0, 0, 0, 3] && features.get(7).is_some_and(|low| low & 0b100 != 0)
        }
        None => false,
    }
}

/// qcow2 if the header has the qcow2 magic and version 2 or 3; raw otherwise (adoption only:
/// after that, the record says).
fn format_from_header(head: &[u8]) -> Format {
    match head {
        [b'Q', b'F', b'I', 0xfb, v0, v1, v2, v3, ..]
            if matches!(u32::from_be_bytes([*v0, *v1, *v2, *v3]), 2 | 3) =>
        {
            Format::Qcow2
        }
        _ => Format::Raw,
    }
}

/// The format the first bytes `head` of the file at `path` show, and the `json:` spec that
/// opens it for adoption: that driver, for qcow2 no backing, and a data file its header names
/// replaced by a `null-co` node (parsed without opening it, then refused).
pub(super) fn adoption_spec(path: &Path, head: &[u8]) -> (Format, OsString) {
    let format = format_from_header(head);
    let mut spec = serde_json::json!({
        "driver": format.as_str(),
        "file": { "driver": "file", "filename": path },
    });
    if format == Format::Qcow2 {
        spec["backing"] = serde_json::Value::Null;
        if qcow2_has_data_file(head) {
            spec["data-file"] = serde_json::json!({ "driver": "null-co" });
        }
    }
    (format, format!("json:{spec}").into())
}

/// The image name a backing file refers to, if it is an image of `root`: a plain name
/// (relative to the image's directory, the root) or `<root>/<name>`.
pub(super) fn backing_name(root: &Path, file: &str) -> Option<String> {
    let path = Path::new(file);
    let name = if path.is_absolute() {
        if path.parent()? != root {
            return None;
        }
        path.file_name()?.to_str()?
    } else {
        let mut normal = path.components().filter(|c| !matches!(c, Component::CurDir));
        let Some(Component::Normal(n)) = normal.next() else { return None };
        if normal.next().is_some() {
            return None;
        }
        n.to_str()?
    };
    check_name(name).ok()?;
    Some(name.to_owned())
}

/// The format an image being adopted says its backing image `backing` has (`backing-filename-format`):
/// qcow2 or raw, nothing else.
pub(super) fn backing_format(name: &str, backing: &str, said: Option<&str>) -> Result<Format, StorageError> {
    match said {
        Some("qcow2") => Ok(Format::Qcow2),
        Some("raw") => Ok(Format::Raw),
        other => Err(StorageError::Unsupported {
            reason: format!(
                "image {name:?}: its backing image {backing:?} has no (or an unsupported) recorded format {other:?}"
            ),
        }),
    }
}

/// The error of a chain from `name` longer than [`MAX_CHAIN`] or back to one of its images.
pub(super) fn chain_too_long(name: &str) -> StorageError {
    StorageError::Unsupported { reason: format!("image {name:?}: backing chain too long or circular") }
}

/// The chain of `name` as `record` gives it: its record, then its backing image's, and so on;
/// at most [`MAX_CHAIN`] images, none twice.
pub(super) fn chain(
    name: &str,
    mut record: impl FnMut(&str) -> Result<Record, StorageError>,
) -> Result<Chain, StorageError> {
    let mut chain = vec![(name.to_owned(), record(name)?)];
    while let Some(backing) = chain.last().and_then(|(_, r)| r.backing.clone()) {
        if chain.len() >= MAX_CHAIN || chain.iter().any(|(n, _)| *n == backing) {
            return Err(chain_too_long(name));
        }
        let next = record(&backing)?;
        chain.push((backing, next));
    }
    Ok(chain)
}

/// The `json:` spec that opens `chain` (images of `root`) as recorded: each image with its
/// recorded driver; a qcow2's backing the next of `chain` if `follow`, else none (`null`) —
/// never what its header names.
pub(super) fn spec(root: &Path, chain: &[(String, Record)], follow: bool) -> OsString {
    fn node(root: &Path, chain: &[(String, Record)], follow: bool) -> serde_json::Value {
        let Some(((name, record), rest)) = chain.split_first() else { return serde_json::Value::Null };
        let mut v = serde_json::json!({
            "driver": record.format.as_str(),
            "file": { "driver": "file", "filename": root.join(name) },
        });
        if record.format == Format::Qcow2 {
            v["backing"] = if follow && record.backing.is_some() {
                node(root, rest, follow)
            } else {
                serde_json::Value::Null
            };
        }
        v
    }
    format!("json:{}", node(root, chain, follow)).into()
}

/// The arguments of `qemu-img create` making the new image `target` of `size` bytes in
/// `format`, with `backing` (its name and recorded format) if a linked clone: `-u`, the
/// backing image is not opened (the size is given); its format is told, never probed.
pub(super) fn create_args(
    format: Format,
    backing: Option<(&str, Format)>,
    target: &Path,
    size: u64,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["create".into(), "-q".into(), "-f".into(), format.as_str().into()];
    if let Some((b, bformat)) = backing {
        args.extend(["-u".into(), "-b".into(), b.into(), "-F".into(), bformat.as_str().into()]);
    }
    args.extend([target.into(), size.to_string().into()]);
    args
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use super::*;

    /// `qemu-img info --output=json` (7.2) of a linked clone with two snapshots.
    const INFO: &str = r#"{
    "snapshots": [
        {
            "icount": 0,
            "vm-clock-nsec": 0,
            "name": "before-upgrade",
            "date-sec": 1795621308,
            "date-nsec": 450158000,
            "vm-clock-sec": 0,
            "id": "1",
            "vm-state-size": 0
        },
        {
            "icount": 0,
            "vm-clock-nsec": 0,
            "name": "s2",
            "date-sec": 1795621400,
            "date-nsec": 0,
            "vm-clock-sec": 0,
            "id": "2",
            "vm-state-size": 4096
        }
    ],
    "backing-filename-format": "qcow2",
    "virtual-size": 1048576,
    "filename": "child",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 200704,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "full-backing-filename": "base",
    "backing-filename": "base",
    "dirty-flag": false
}"#;

    #[test]
    fn parses_captured_info() {
        let j = parse_info(INFO.as_bytes()).unwrap();
        assert_eq!(j.format, "qcow2");
        assert_eq!(j.virtual_size, 1 << 20);
        assert_eq!(j.actual_size, Some(200704));
        assert_eq!(j.backing_filename.as_deref(), Some("base"));
        assert_eq!(j.backing_format.as_deref(), Some("qcow2"));
        assert!(j.format_specific.unwrap().data.unwrap().data_file.is_none());
        let snaps: Vec<_> = j.snapshots.iter().map(SnapshotJson::to_info).collect();
        assert_eq!(
            snaps,
            [
                SnapshotInfo {
                    name: "before-upgrade".into(),
                    id: "1".into(),
                    date: 1795621308,
                    vm_state_size: 0
                },
                SnapshotInfo { name: "s2".into(), id: "2".into(), date: 1795621400, vm_state_size: 4096 },
            ]
        );
        let raw = r#"{"virtual-size": 1048576, "filename": "r", "format": "raw", "actual-size": 4096, "dirty-flag": false}"#;
        let j = parse_info(raw.as_bytes()).unwrap();
        assert!(j.snapshots.is_empty() && j.backing_filename.is_none() && j.format_specific.is_none());
        let data_file = r#"{"virtual-size": 512, "format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"data-file": "/etc/shadow", "data-file-raw": false}}}"#;
        let j = parse_info(data_file.as_bytes()).unwrap();
        assert_eq!(j.format_specific.unwrap().data.unwrap().data_file.as_deref(), Some("/etc/shadow"));
        for bad in ["", "{", "[]", r#"{"format": "raw"}"#, r#"{"format": "raw", "virtual-size": -1}"#] {
            assert!(parse_info(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes() {
        assert!(check_size(Size(512)).is_ok());
        assert!(check_size(Size(1 << 60)).is_ok());
        for bad in [0, 1, 1000, (1 << 60) + 512, u64::MAX] {
            assert!(matches!(check_size(Size(bad)), Err(StorageError::InvalidSize { .. })), "{bad}");
        }
    }

    #[test]
    fn formats_from_headers() {
        assert_eq!(format_from_header(b"QFI\xfb\0\0\0\x03rest"), Format::Qcow2);
        assert_eq!(format_from_header(b"QFI\xfb\0\0\0\x02"), Format::Qcow2);
        assert_eq!(format_from_header(b"QFI\xfb\0\0\0\x01"), Format::Raw);
        assert_eq!(format_from_header(b"QFI\xfb"), Format::Raw);
        assert_eq!(format_from_header(b"# Disk DescriptorFile"), Format::Raw);
        assert_eq!(format_from_header(b""), Format::Raw);
    }

    #[test]
    fn backing_names() {
        let root = Path::new("/var/images");
        assert_eq!(backing_name(root, "base").as_deref(), Some("base"));
        assert_eq!(backing_name(root, "./base").as_deref(), Some("base"));
        assert_eq!(backing_name(root, "/var/images/base").as_deref(), Some("base"));
        for bad in [
            "../base",
            "/etc/passwd",
            "/var/images/a/b",
            "a/b",
            "/var/images/.x",
            "json:{}",
            "",
            "nbd://h/x",
            "/",
        ] {
            assert_eq!(backing_name(root, bad), None, "{bad:?}");
        }
    }

    fn rec(format: Format, backing: Option<&str>) -> Record {
        Record {
            format,
            backing: backing.map(str::to_owned),
            virtual_size: 1 << 20,
            snapshots: 0,
            owner: super::super::Owner::Toolstack,
        }
    }

    fn json_of(spec: &OsString) -> serde_json::Value {
        let text = spec.to_str().unwrap().strip_prefix("json:").unwrap();
        serde_json::from_str(text).unwrap()
    }

    /// The spec opens what the record says: the recorded drivers, the recorded chain when
    /// followed, `"backing": null` otherwise (never left to the header), none for raw.
    #[test]
    fn specs_open_images_as_recorded() {
        let root = Path::new("/srv/images");
        let chain = vec![
            ("top".to_owned(), rec(Format::Qcow2, Some("mid"))),
            ("mid".to_owned(), rec(Format::Qcow2, Some("base"))),
            ("base".to_owned(), rec(Format::Raw, None)),
        ];
        let file = |n: &str| serde_json::json!({ "driver": "file", "filename": format!("/srv/images/{n}") });
        assert_eq!(
            json_of(&spec(root, &chain, true)),
            serde_json::json!({
                "driver": "qcow2", "file": file("top"),
                "backing": {
                    "driver": "qcow2", "file": file("mid"),
                    "backing": { "driver": "raw", "file": file("base") },
                },
            })
        );
        assert_eq!(
            json_of(&spec(root, &chain, false)),
            serde_json::json!({ "driver": "qcow2", "file": file("top"), "backing": null })
        );
        let qcow2_alone = [("top".to_owned(), rec(Format::Qcow2, None))];
        assert_eq!(
            json_of(&spec(root, &qcow2_alone, true)),
            serde_json::json!({ "driver": "qcow2", "file": file("top"), "backing": null })
        );
        let raw = [("r".to_owned(), rec(Format::Raw, None))];
        assert_eq!(
            json_of(&spec(root, &raw, false)),
            serde_json::json!({ "driver": "raw", "file": file("r") })
        );
    }

    /// Adoption opens a file as its header says, with no backing, and a data file its header
    /// names never reaches qemu-img as a file.
    #[test]
    fn adoption_specs_follow_no_header_reference() {
        let path = Path::new("/srv/images/a");
        let file = serde_json::json!({ "driver": "file", "filename": "/srv/images/a" });
        let (format, s) = adoption_spec(path, b"anything");
        assert_eq!(format, Format::Raw);
        assert_eq!(json_of(&s), serde_json::json!({ "driver": "raw", "file": file }));
        let mut head = vec![0u8; QCOW2_HEADER];
        head[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        let (format, s) = adoption_spec(path, &head);
        assert_eq!(format, Format::Qcow2);
        assert_eq!(json_of(&s), serde_json::json!({ "driver": "qcow2", "file": file, "backing": null }));
        head[79] = 0b100;
        let (_, s) = adoption_spec(path, &head);
        assert_eq!(
            json_of(&s),
            serde_json::json!({
                "driver": "qcow2", "file": file, "backing": null, "data-file": { "driver": "null-co" },
            })
        );
        // Version 2 has no incompatible features: the same bit means nothing.
        head[7] = 2;
        let (_, s) = adoption_spec(path, &head);
        assert_eq!(json_of(&s), serde_json::json!({ "driver": "qcow2", "file": file, "backing": null }));
    }

    /// A chain follows the records, and stops at MAX_CHAIN images or at an image seen before.
    #[test]
    fn chains_are_bounded_and_acyclic() {
        let mut records = HashMap::new();
        let lookup = |records: &HashMap<String, Record>| {
            let records = records.clone();
            move |n: &str| records.get(n).cloned().ok_or(StorageError::NotFound { name: n.to_owned() })
        };
        records.insert("a".to_owned(), rec(Format::Qcow2, Some("b")));
        records.insert("b".to_owned(), rec(Format::Raw, None));
        let names: Vec<String> = chain("a", lookup(&records)).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(chain("x", lookup(&records)), Err(StorageError::NotFound { name: "x".into() }));
        records.insert("b".to_owned(), rec(Format::Qcow2, Some("a")));
        // A cycle is refused when it closes, not after MAX_CHAIN lookups.
        let mut lookups = 0;
        let counted = lookup(&records);
        let counting = |n: &str| {
            lookups += 1;
            counted(n)
        };
        assert_eq!(chain("a", counting), Err(chain_too_long("a")));
        assert_eq!(lookups, 2);
        for i in 0..MAX_CHAIN {
            records.insert(format!("c{i}"), rec(Format::Qcow2, Some(&format!("c{}", i + 1))));
        }
        records.insert(format!("c{MAX_CHAIN}"), rec(Format::Qcow2, None));
        assert_eq!(chain("c0", lookup(&records)), Err(chain_too_long("c0")));
        assert_eq!(chain("c1", lookup(&records)).unwrap().len(), MAX_CHAIN);
    }

    #[test]
    fn create_arguments_name_every_format() {
        let args = |a: Vec<OsString>| a.into_iter().map(|s| s.into_string().unwrap()).collect::<Vec<_>>();
        let tmp = Path::new("/r/.tmp-x-1");
        assert_eq!(
            args(create_args(Format::Raw, None, tmp, 512)),
            ["create", "-q", "-f", "raw", "/r/.tmp-x-1", "512"]
        );
        assert_eq!(
            args(create_args(Format::Qcow2, Some(("base", Format::Raw)), tmp, 1024)),
            ["create", "-q", "-f", "qcow2", "-u", "-b", "base", "-F", "raw", "/r/.tmp-x-1", "1024"]
        );
    }
}

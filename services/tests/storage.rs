//! `QemuImg` on the real `qemu-img` (qemu-utils), through the `Storage` trait, in temporary
//! directories: every method, every error it can provoke, confinement to the root, progress of a
//! full clone, cancellation, and a full disk (a small tmpfs in a private mount namespace, as
//! root).

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{LIVENESS, QemuImgGate, TempDir, err, missing_prerequisite, processes_mentioning};
use dombus_services::storage::{Format, QemuImg, Size, Storage, StorageError};

const MIB: u64 = 1 << 20;

/// A unique temporary directory, removed when dropped.
impl TempDir {
    fn storage(&self) -> QemuImg {
        QemuImg::new(self.0.clone(), "qemu-img".into()).unwrap()
    }

    /// The service running `gate`'s qemu-img.
    fn storage_with(&self, gate: &QemuImgGate) -> QemuImg {
        QemuImg::with_config(self.0.clone(), gate.program(), gate.config()).unwrap()
    }

    fn temp_files(&self) -> Vec<String> {
        temp_files(&self.0)
    }
}

/// The temporary files of operations (`.tmp-*`) in `dir`.
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

/// Writes a raw image of `size` bytes of non-zero data derived from `seed`.
fn write_raw(path: &Path, size: u64, seed: u8) {
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 ^ seed | 1).collect();
    let mut f = std::fs::File::create(path).unwrap();
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        f.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
}

/// Runs qemu-img with `args`; its exit code.
fn qemu_img(args: &[&str]) -> i32 {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    out.status.code().unwrap_or(-1)
}

/// Whether two images have the same guest-visible content (`qemu-img compare`).
fn same_content(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-f", a_fmt, "-F", b_fmt])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!("qemu-img compare: {other:?} {}", String::from_utf8_lossy(&out.stderr)),
    }
}

#[test]
fn new_checks_the_tool_locks_the_root_and_removes_stale_temporaries() {
    let dir = TempDir::new("new");
    let e = QemuImg::new(dir.path("images"), "/nonexistent/qemu-img".into()).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("/nonexistent/qemu-img") && text.contains("apt-get install qemu-utils"), "{text}");

    let root = dir.path("images");
    std::fs::write(root.join(".tmp-disk-0123456789abcdef"), b"partial").unwrap();
    std::fs::write(root.join("keep"), b"").unwrap();
    let storage = QemuImg::new(root.clone(), "qemu-img".into()).unwrap();
    assert!(!root.join(".tmp-disk-0123456789abcdef").exists());
    assert!(root.join("keep").exists());
    assert_eq!(storage.root(), root.canonicalize().unwrap());

    let e = QemuImg::new(root.clone(), "qemu-img".into()).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    drop(storage);
    QemuImg::new(root, "qemu-img".into()).unwrap();
}

#[tokio::test]
async fn create_info_list_delete() {
    let dir = TempDir::new("create");
    let s = dir.storage();

    let a = s.create("a".into(), Size(MIB), None, None).await.unwrap();
    assert_eq!(
        (a.name.as_str(), a.format, a.virtual_size, a.backing, a.snapshots),
        ("a", Format::Qcow2, MIB, None, 0)
    );
    assert!(a.actual_size > 0);
    let r = s.create("r".into(), Size(2 * MIB), Some(Format::Raw), None).await.unwrap();
    assert_eq!((r.format, r.virtual_size), (Format::Raw, 2 * MIB));
    let c = s.create("c".into(), Size(4 * MIB), Some(Format::Qcow2), Some("a".into())).await.unwrap();
    assert_eq!((c.format, c.virtual_size, c.backing.as_deref()), (Format::Qcow2, 4 * MIB, Some("a")));
    let on_raw = s.create("on-raw".into(), Size(2 * MIB), None, Some("r".into())).await.unwrap();
    assert_eq!(on_raw.backing.as_deref(), Some("r"));
    // Recorded relative, so the root can move.
    let out =
        Command::new("qemu-img").args(["info", "-U", "--output=json"]).arg(dir.path("c")).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["backing-filename"], "a");
    assert_eq!(json["backing-filename-format"], "qcow2");

    assert_eq!(s.info("c".into()).await.unwrap(), c);
    let names: Vec<_> = s.list().await.unwrap().into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["a", "c", "on-raw", "r"]);

    assert_eq!(
        err(s.create("a".into(), Size(MIB), None, None).await),
        StorageError::AlreadyExists { name: "a".into() }
    );
    assert_eq!(
        err(s.create("x".into(), Size(MIB), None, Some("missing".into())).await),
        StorageError::NotFound { name: "missing".into() }
    );
    assert!(matches!(
        err(s.create("x".into(), Size(MIB), Some(Format::Raw), Some("a".into())).await),
        StorageError::Unsupported { .. }
    ));
    for bad in [0, 1000, (1 << 60) + 512] {
        assert!(
            matches!(
                err(s.create("x".into(), Size(bad), None, None).await),
                StorageError::InvalidSize { .. }
            ),
            "{bad}"
        );
    }
    assert_eq!(err(s.info("x".into()).await), StorageError::NotFound { name: "x".into() });

    // A backing image stays while clones use it.
    match err(s.delete("a".into()).await) {
        StorageError::Busy { name, operation } => {
            assert!(name == "a" && operation.contains('c'), "{operation}")
        }
        e => panic!("{e:?}"),
    }
    s.delete("c".into()).await.unwrap();
    s.delete("a".into()).await.unwrap();
    assert_eq!(err(s.delete("a".into()).await), StorageError::NotFound { name: "a".into() });
    assert_eq!(err(s.info("a".into()).await), StorageError::NotFound { name: "a".into() });
    assert!(s.progress("a".into()).await.is_none());
    let names: Vec<_> = s.list().await.unwrap().into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["on-raw", "r"]);
    assert!(dir.temp_files().is_empty());
}

#[tokio::test]
async fn resize_grows_and_shrinks_only_when_forced() {
    let dir = TempDir::new("resize");
    let s = dir.storage();
    s.create("q".into(), Size(4 * MIB), None, None).await.unwrap();
    s.create("r".into(), Size(4 * MIB), Some(Format::Raw), None).await.unwrap();
    for name in ["q", "r"] {
        assert_eq!(s.resize(name.into(), Size(8 * MIB), false).await.unwrap().virtual_size, 8 * MIB);
        assert!(matches!(
            err(s.resize(name.into(), Size(2 * MIB), false).await),
            StorageError::InvalidSize { .. }
        ));
        assert_eq!(s.info(name.into()).await.unwrap().virtual_size, 8 * MIB);
        assert_eq!(s.resize(name.into(), Size(2 * MIB), true).await.unwrap().virtual_size, 2 * MIB);
        assert_eq!(s.resize(name.into(), Size(2 * MIB), false).await.unwrap().virtual_size, 2 * MIB);
        assert!(matches!(
            err(s.resize(name.into(), Size(777), true).await),
            StorageError::InvalidSize { .. }
        ));
        assert!(matches!(err(s.resize(name.into(), Size(0), true).await), StorageError::InvalidSize { .. }));
    }
    assert_eq!(
        err(s.resize("nope".into(), Size(MIB), false).await),
        StorageError::NotFound { name: "nope".into() }
    );
    // Changing the size of a backing image would change what its clones see.
    s.clone_disk("q".into(), "c".into(), true, None).await.unwrap();
    assert!(matches!(err(s.resize("q".into(), Size(16 * MIB), false).await), StorageError::Busy { .. }));
    assert_eq!(s.resize("c".into(), Size(16 * MIB), false).await.unwrap().virtual_size, 16 * MIB);
}

#[tokio::test]
async fn snapshots_create_list_revert_delete() {
    let dir = TempDir::new("snap");
    let s = dir.storage();
    let data = TempDir::new("snap-data");
    let (ab, cd) = (data.path("ab.raw"), data.path("cd.raw"));
    write_raw(&ab, 4 * MIB, 0xab);
    write_raw(&cd, 4 * MIB, 0xcd);

    std::fs::copy(&ab, dir.path("raw")).unwrap();
    assert!(matches!(
        err(s.snapshot_create("raw".into(), "s1".into()).await),
        StorageError::Unsupported { .. }
    ));
    assert!(matches!(err(s.snapshot_list("nope".into()).await), StorageError::NotFound { .. }));
    assert!(matches!(
        err(s.snapshot_create("nope".into(), "s1".into()).await),
        StorageError::NotFound { .. }
    ));

    s.clone_disk("raw".into(), "q".into(), false, Some(Format::Qcow2)).await.unwrap();
    let q = dir.path("q");
    assert!(same_content(&q, "qcow2", &ab, "raw"));
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let s1 = s.snapshot_create("q".into(), "s1".into()).await.unwrap();
    assert_eq!((s1.name.as_str(), s1.vm_state_size), ("s1", 0));
    assert!(s1.date + 5 >= before && !s1.id.is_empty(), "{s1:?}");
    assert_eq!(s.snapshot_list("q".into()).await.unwrap(), std::slice::from_ref(&s1));
    assert_eq!(s.info("q".into()).await.unwrap().snapshots, 1);
    assert_eq!(
        err(s.snapshot_create("q".into(), "s1".into()).await),
        StorageError::AlreadyExists { name: "q@s1".into() }
    );
    assert!(matches!(
        err(s.snapshot_create("q".into(), "42".into()).await),
        StorageError::InvalidName { .. }
    ));
    assert!(matches!(
        err(s.snapshot_create("q".into(), "../s".into()).await),
        StorageError::InvalidName { .. }
    ));

    // Overwrite the data, then go back.
    assert_eq!(
        qemu_img(&["convert", "-n", "-f", "raw", "-O", "qcow2", cd.to_str().unwrap(), q.to_str().unwrap()]),
        0
    );
    assert!(same_content(&q, "qcow2", &cd, "raw"));
    let s2 = s.snapshot_create("q".into(), "s2".into()).await.unwrap();
    assert_eq!(s.snapshot_list("q".into()).await.unwrap(), [s1.clone(), s2.clone()]);
    s.snapshot_revert("q".into(), "s1".into()).await.unwrap();
    assert!(same_content(&q, "qcow2", &ab, "raw"));
    s.snapshot_revert("q".into(), "s2".into()).await.unwrap();
    assert!(same_content(&q, "qcow2", &cd, "raw"));
    let missing = StorageError::SnapshotNotFound { disk: "q".into(), snapshot: "s9".into() };
    assert_eq!(err(s.snapshot_revert("q".into(), "s9".into()).await), missing);
    assert_eq!(err(s.snapshot_delete("q".into(), "s9".into()).await), missing);

    s.snapshot_delete("q".into(), "s1".into()).await.unwrap();
    assert_eq!(s.snapshot_list("q".into()).await.unwrap(), [s2]);
    assert!(same_content(&q, "qcow2", &cd, "raw"));
    s.snapshot_delete("q".into(), "s2".into()).await.unwrap();
    assert!(s.snapshot_list("q".into()).await.unwrap().is_empty());

    // Reverting a backing image would change what its clones see.
    s.snapshot_create("q".into(), "s3".into()).await.unwrap();
    s.clone_disk("q".into(), "c".into(), true, None).await.unwrap();
    assert!(matches!(err(s.snapshot_revert("q".into(), "s3".into()).await), StorageError::Busy { .. }));
    s.snapshot_create("c".into(), "on-clone".into()).await.unwrap();
    s.snapshot_revert("c".into(), "on-clone".into()).await.unwrap();
}

#[tokio::test]
async fn clones_linked_and_full_and_a_movable_root() {
    let top = TempDir::new("clone");
    let root = top.path("images");
    let s = QemuImg::new(root.clone(), "qemu-img".into()).unwrap();
    write_raw(&root.join("base"), 8 * MIB, 7);

    let linked = s.clone_disk("base".into(), "linked".into(), true, None).await.unwrap();
    assert_eq!(
        (linked.format, linked.virtual_size, linked.backing.as_deref()),
        (Format::Qcow2, 8 * MIB, Some("base"))
    );
    assert!(same_content(&root.join("linked"), "qcow2", &root.join("base"), "raw"));
    assert!(matches!(
        err(s.clone_disk("base".into(), "x".into(), true, Some(Format::Raw)).await),
        StorageError::Unsupported { .. }
    ));
    let linked2 = s.clone_disk("linked".into(), "linked2".into(), true, None).await.unwrap();
    assert_eq!(linked2.backing.as_deref(), Some("linked"));

    let full = s.clone_disk("linked2".into(), "full".into(), false, None).await.unwrap();
    assert_eq!((full.format, full.backing.as_ref(), full.virtual_size), (Format::Qcow2, None, 8 * MIB));
    assert!(same_content(&root.join("full"), "qcow2", &root.join("base"), "raw"));
    let full_raw = s.clone_disk("full".into(), "full-raw".into(), false, Some(Format::Raw)).await.unwrap();
    assert_eq!(full_raw.format, Format::Raw);
    assert_eq!(std::fs::read(root.join("full-raw")).unwrap(), std::fs::read(root.join("base")).unwrap());

    assert_eq!(
        err(s.clone_disk("base".into(), "full".into(), false, None).await),
        StorageError::AlreadyExists { name: "full".into() }
    );
    assert_eq!(
        err(s.clone_disk("base".into(), "linked".into(), true, None).await),
        StorageError::AlreadyExists { name: "linked".into() }
    );
    assert_eq!(
        err(s.clone_disk("nope".into(), "x".into(), false, None).await),
        StorageError::NotFound { name: "nope".into() }
    );
    assert!(top.path("images").join("x").symlink_metadata().is_err());
    assert!(s.progress("full".into()).await.is_none());
    assert!(temp_files(&root).is_empty());

    // Move the root: the linked clones still find their backing images.
    drop(s);
    let moved = top.path("moved");
    std::fs::rename(&root, &moved).unwrap();
    let s = QemuImg::new(moved.clone(), "qemu-img".into()).unwrap();
    assert_eq!(s.info("linked2".into()).await.unwrap().backing.as_deref(), Some("linked"));
    s.clone_disk("linked2".into(), "flat".into(), false, Some(Format::Raw)).await.unwrap();
    assert_eq!(std::fs::read(moved.join("flat")).unwrap(), std::fs::read(moved.join("base")).unwrap());
    s.delete("linked2".into()).await.unwrap();
    s.delete("linked".into()).await.unwrap();
    s.delete("base".into()).await.unwrap();
    let names: Vec<_> = s.list().await.unwrap().into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["flat", "full", "full-raw"]);
}

#[tokio::test]
async fn names_are_confined_to_the_root() {
    let dir = TempDir::new("confine");
    let outside = TempDir::new("outside");
    let s = dir.storage();
    s.create("real".into(), Size(MIB), None, None).await.unwrap();

    let long = "x".repeat(65);
    for bad in ["../x", "/etc/passwd", "a/b", ".hidden", "", ".", "..", long.as_str(), "a b", "c:d"] {
        let invalid = |e: StorageError| matches!(e, StorageError::InvalidName { .. });
        let b = || bad.to_owned();
        assert!(invalid(err(s.create(b(), Size(MIB), None, None).await)), "{bad:?}");
        assert!(invalid(err(s.create("ok".into(), Size(MIB), None, Some(b())).await)), "{bad:?}");
        assert!(invalid(err(s.info(b()).await)), "{bad:?}");
        assert!(invalid(err(s.resize(b(), Size(MIB), true).await)), "{bad:?}");
        assert!(invalid(err(s.snapshot_create(b(), "s".into()).await)), "{bad:?}");
        assert!(invalid(err(s.snapshot_create("real".into(), b()).await)), "{bad:?}");
        assert!(invalid(err(s.snapshot_list(b()).await)), "{bad:?}");
        assert!(invalid(err(s.snapshot_revert(b(), "s".into()).await)), "{bad:?}");
        assert!(invalid(err(s.snapshot_delete(b(), "s".into()).await)), "{bad:?}");
        assert!(invalid(err(s.clone_disk(b(), "ok".into(), false, None).await)), "{bad:?}");
        assert!(invalid(err(s.clone_disk("real".into(), b(), true, None).await)), "{bad:?}");
        assert!(invalid(err(s.delete(b()).await)), "{bad:?}");
        assert!(s.progress(b()).await.is_none());
    }
    assert!(Path::new("/etc/passwd").exists());
    assert!(!dir.path("ok").exists());

    // Things in the root that are not regular files.
    let secret = outside.path("secret");
    std::fs::write(&secret, b"secret").unwrap();
    std::os::unix::fs::symlink(dir.path("real"), dir.path("inside")).unwrap();
    std::os::unix::fs::symlink(&secret, dir.path("outside")).unwrap();
    std::os::unix::fs::symlink(outside.path("dangling"), dir.path("dangling")).unwrap();
    std::fs::create_dir(dir.path("dir")).unwrap();
    assert!(Command::new("mkfifo").arg(dir.path("fifo")).status().unwrap().success());
    for planted in ["inside", "outside", "dangling", "dir", "fifo"] {
        let p = || planted.to_owned();
        let invalid = |e: StorageError| matches!(e, StorageError::InvalidName { .. });
        assert!(invalid(err(s.info(p()).await)), "{planted}");
        assert!(invalid(err(s.create(p(), Size(MIB), Some(Format::Raw), None).await)), "{planted}");
        assert!(invalid(err(s.create("ok".into(), Size(MIB), None, Some(p())).await)), "{planted}");
        assert!(invalid(err(s.resize(p(), Size(2 * MIB), true).await)), "{planted}");
        assert!(invalid(err(s.snapshot_create(p(), "s".into()).await)), "{planted}");
        assert!(invalid(err(s.clone_disk(p(), "ok".into(), false, None).await)), "{planted}");
        assert!(invalid(err(s.clone_disk(p(), "ok".into(), true, None).await)), "{planted}");
        assert!(invalid(err(s.clone_disk("real".into(), p(), false, None).await)), "{planted}");
        assert!(invalid(err(s.delete(p()).await)), "{planted}");
    }
    assert_eq!(std::fs::read(&secret).unwrap(), b"secret");
    assert!(!outside.path("dangling").exists());
    assert!(dir.path("inside").symlink_metadata().unwrap().file_type().is_symlink());

    // Images whose backing file or data file is outside the root.
    let ext = outside.path("ext.qcow2");
    assert_eq!(qemu_img(&["create", "-q", "-f", "qcow2", ext.to_str().unwrap(), "1M"]), 0);
    // A qcow2 at `path` whose backing file is named `backing` (not checked by qemu-img here).
    let qcow2_backed_by = |backing: &str, path: &Path| {
        let args = ["create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", path.to_str().unwrap()];
        assert_eq!(qemu_img(&args), 0);
    };
    let evil_abs = dir.path("evil-abs");
    qcow2_backed_by(ext.to_str().unwrap(), &evil_abs);
    let relative = format!("../{}/ext.qcow2", outside.0.file_name().unwrap().to_str().unwrap());
    let evil_rel = dir.path("evil-rel");
    qcow2_backed_by(&relative, &evil_rel);
    let evil_data = dir.path("evil-data");
    let data_opt = format!("data_file={}", outside.path("data").display());
    assert_eq!(
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &data_opt, evil_data.to_str().unwrap(), "1M"]),
        0
    );
    for evil in ["evil-abs", "evil-rel", "evil-data"] {
        let e = || evil.to_owned();
        assert!(matches!(err(s.info(e()).await), StorageError::InvalidName { .. }), "{evil}");
        assert!(matches!(
            err(s.clone_disk(e(), "ok".into(), false, None).await),
            StorageError::InvalidName { .. }
        ));
        assert!(matches!(
            err(s.clone_disk(e(), "ok".into(), true, None).await),
            StorageError::InvalidName { .. }
        ));
        assert!(matches!(err(s.resize(e(), Size(4 * MIB), false).await), StorageError::InvalidName { .. }));
        assert!(matches!(err(s.snapshot_create(e(), "s".into()).await), StorageError::InvalidName { .. }));
    }

    // The format is never probed: a vmdk descriptor naming a file outside is a raw image.
    let descriptor = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\
         RW 1 FLAT \"{}\" 0\n",
        secret.display()
    );
    let descriptor = format!("{descriptor:\n<512}"); // qemu rounds a raw image's size to sectors
    std::fs::write(dir.path("vmdk"), &descriptor).unwrap();
    let v = s.info("vmdk".into()).await.unwrap();
    assert_eq!((v.format, v.virtual_size), (Format::Raw, descriptor.len() as u64));
    s.clone_disk("vmdk".into(), "vmdk-copy".into(), false, None).await.unwrap();
    assert_eq!(std::fs::read(dir.path("vmdk-copy")).unwrap(), descriptor.as_bytes());

    // A broken qcow2: qemu-img's own error.
    let mut broken = b"QFI\xfb\0\0\0\x03".to_vec();
    broken.extend([0xff; 504]);
    std::fs::write(dir.path("broken"), broken).unwrap();
    match err(s.info("broken".into()).await) {
        StorageError::ToolFailed { tool, status, message } => {
            assert_eq!(tool, "qemu-img");
            assert!(
                status.contains('1') && !message.is_empty() && message.len() <= 4100,
                "{status} {message}"
            );
        }
        e => panic!("{e:?}"),
    }

    let names: Vec<_> = s.list().await.unwrap().into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["real", "vmdk", "vmdk-copy"]);
    assert!(dir.temp_files().is_empty());
}

#[tokio::test]
async fn an_image_locked_by_another_process_is_busy() {
    let dir = TempDir::new("lock");
    let s = dir.storage();
    s.create("q".into(), Size(MIB), None, None).await.unwrap();
    let path = dir.path("q");
    let hold = || {
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "sleep 20000"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
    };
    let io = match hold() {
        Ok(io) => io,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return missing_prerequisite(
                "an_image_locked_by_another_process_is_busy",
                "no qemu-io (qemu-utils)",
            );
        }
        Err(e) => panic!("qemu-io: {e}"),
    };
    let mut io = KillOnDrop(io);
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        // If our probe below held the lock just when qemu-io opened the image, qemu-io gave up.
        if io.0.try_wait().unwrap().is_some() {
            io = KillOnDrop(hold().unwrap());
            continue;
        }
        // Without -U, info fails while qemu-io holds the write lock.
        let out = Command::new("qemu-img").args(["info", "-f", "qcow2"]).arg(&path).output().unwrap();
        if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("lock") {
            break;
        }
        assert!(start.elapsed() < LIVENESS, "qemu-io never locked the image (liveness limit)");
    }
    assert!(matches!(err(s.snapshot_create("q".into(), "s".into()).await), StorageError::Busy { .. }));
    assert!(matches!(err(s.resize("q".into(), Size(2 * MIB), false).await), StorageError::Busy { .. }));
    assert_eq!(s.info("q".into()).await.unwrap().virtual_size, MIB);
    drop(io);
    s.snapshot_create("q".into(), "s".into()).await.unwrap();
}

/// A child process killed (and reaped) when dropped, even by a failed assertion.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The source of the full clones below: big enough that qemu-img reports progress between 0 and
/// 100 % on the way (qemu-img prints a line per percent).
const BIG: u64 = 64 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_clone_reports_progress() {
    let dir = TempDir::new("progress");
    let gate = QemuImgGate::new("progress");
    let s = dir.storage_with(&gate);
    write_raw(&dir.path("big"), BIG, 3);
    // The clone stops (as the service sees it) at its first progress between 0 and 100 %, until
    // the test has looked at it.
    gate.hold_converts();
    let s2 = s.clone();
    let mut clone =
        tokio::spawn(
            async move { s2.clone_disk("big".into(), "copy".into(), false, Some(Format::Qcow2)).await },
        );
    let started = Instant::now();
    let held = loop {
        assert!(!clone.is_finished(), "the clone finished while held: {:?}", (&mut clone).await);
        assert!(started.elapsed() < LIVENESS, "no progress between 0 and 100 % (liveness limit)");
        if let Some(p) = s.progress("copy".into()).await {
            assert_eq!(p.operation, "clone from big");
            if p.percent > 0.0 && p.percent < 100.0 {
                break p;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    // (The wrapper marks its hold just after passing that line on.)
    let t = Instant::now();
    while !gate.held() {
        assert!(t.elapsed() < LIVENESS, "progress {held:?} published, but qemu-img's output was not held");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // While it runs: the target's name and the source are busy, the source shows no progress.
    let busy = |e: StorageError| matches!(e, StorageError::Busy { .. });
    assert!(busy(err(s.create("copy".into(), Size(MIB), None, None).await)));
    assert!(busy(err(s.clone_disk("big".into(), "copy".into(), true, None).await)));
    assert!(busy(err(s.delete("big".into()).await)));
    assert!(busy(err(s.resize("big".into(), Size(BIG * 2), false).await)));
    assert!(s.progress("big".into()).await.is_none());
    assert_eq!(
        s.progress("copy".into()).await.map(|p| p.percent),
        Some(held.percent),
        "progress moved while held"
    );
    gate.release();
    let copy =
        tokio::time::timeout(LIVENESS, clone).await.expect("clone hung after release").unwrap().unwrap();
    eprintln!("full clone of {} MiB: progress {:.2} % seen while it ran", BIG >> 20, held.percent);
    assert_eq!((copy.format, copy.virtual_size), (Format::Qcow2, BIG));
    assert!(s.progress("copy".into()).await.is_none());
    assert!(dir.temp_files().is_empty());
    assert!(same_content(&dir.path("copy"), "qcow2", &dir.path("big"), "raw"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_clone_leaves_nothing() {
    let dir = TempDir::new("cancel");
    let gate = QemuImgGate::new("cancel");
    let s = dir.storage_with(&gate);
    write_raw(&dir.path("big"), BIG, 5);
    // 64 MiB at 1 MiB/s: about a minute of copying, so the cancellation below kills a real copy
    // in the middle (the test goes on at the first progress, in a second or so).
    gate.slow_converts("1M");
    let clone = s.clone_disk("big".into(), "copy".into(), false, Some(Format::Qcow2));
    let running = async {
        loop {
            let p = s.progress("copy".into()).await;
            if p.as_ref().is_some_and(|p| p.percent > 0.0) && !dir.temp_files().is_empty() {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    // The client goes away (or the deadline passes) mid-copy: the call's future is dropped.
    let seen = tokio::select! {
        r = clone => panic!("the clone finished before it could be cancelled: {r:?}"),
        p = running => p,
        _ = tokio::time::sleep(LIVENESS) => panic!("no progress from the clone (liveness limit)"),
    };
    let cancelled = Instant::now();
    let percent = f64::from(seen.map_or(0.0, |p| p.percent));
    eprintln!("cancelled at {percent:.2} %");
    assert!(s.progress("copy".into()).await.is_none());
    assert!(!dir.path("copy").exists());
    // At 1 MiB/s the rest of the copy takes `left`: a qemu-img gone well before that was
    // killed, one still there after half of it was not.
    let left = Duration::from_secs_f64((BIG >> 20) as f64 * (100.0 - percent) / 100.0);
    while !processes_mentioning(&dir.0).is_empty() {
        assert!(
            cancelled.elapsed() < left / 2,
            "qemu-img {:?} still copying {:?} after the cancellation (its copy had {left:?} to go): not killed",
            processes_mentioning(&dir.0),
            cancelled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("qemu-img gone {:?} after the cancellation", cancelled.elapsed());
    while !dir.temp_files().is_empty() {
        assert!(
            cancelled.elapsed() < LIVENESS,
            "temporary files left (liveness limit): {:?}",
            dir.temp_files()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // qemu-img is gone: nothing can write into the root any more.
    assert!(dir.temp_files().is_empty() && !dir.path("copy").exists());
    // The name is free again.
    s.clone_disk("big".into(), "copy".into(), true, None).await.unwrap();
}

/// Set in the child that runs [`no_space`] inside a private mount namespace: the tmpfs.
const TMPFS_ENV: &str = "DOMBUS_STORAGE_TEST_TMPFS";

#[test]
fn no_space() {
    if let Ok(dir) = std::env::var(TMPFS_ENV) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        return rt.block_on(no_space_on(PathBuf::from(dir)));
    }
    if !rustix::process::geteuid().is_root() {
        return missing_prerequisite(
            "no_space",
            "needs root (mounts an 8 MiB tmpfs in a private mount namespace)",
        );
    }
    // Whether this machine gives us a private mount namespace at all (a container may not).
    let probe = Command::new("unshare").args(["--mount", "--propagation", "private", "true"]).output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            let why = String::from_utf8_lossy(&o.stderr);
            return missing_prerequisite("no_space", &format!("no private mount namespace: {}", why.trim()));
        }
        Err(e) => return missing_prerequisite("no_space", &format!("unshare (util-linux): {e}")),
    }
    let dir = TempDir::new("nospace");
    let exe = std::env::current_exe().unwrap();
    // Exit status 77 only if the mount fails; anything else is the test's own outcome.
    let script = r#"mount -t tmpfs -o size=8M dombus-test "$1" || exit 77
exec "$0" no_space --exact --nocapture --test-threads=1"#;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(&exe)
        .arg(&dir.0)
        .env(TMPFS_ENV, &dir.0)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.code() == Some(77) {
        return missing_prerequisite("no_space", &format!("cannot mount a tmpfs: {}", stderr.trim()));
    }
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    eprintln!("{}", stderr.trim());
}

/// On an 8 MiB tmpfs.
async fn no_space_on(root: PathBuf) {
    let s = QemuImg::new(root.clone(), "qemu-img".into()).unwrap();
    let free = rustix::fs::statvfs(&root).unwrap();
    assert!(free.f_blocks * free.f_frsize <= 8 * MIB, "not on the small tmpfs");
    write_raw(&root.join("src"), 5 * MIB, 9);

    // The free-space check before a full copy.
    match err(s.clone_disk("src".into(), "copy".into(), false, None).await) {
        StorageError::NoSpace { message } => eprintln!("no_space: full clone refused: {message}"),
        e => panic!("{e:?}"),
    }
    assert!(!root.join("copy").exists());
    s.clone_disk("src".into(), "linked".into(), true, None).await.unwrap();

    // qemu-img's own ENOSPC: fill the disk, then create.
    let mut fill = std::fs::File::create(root.join(".fill")).unwrap();
    let block = vec![1u8; MIB as usize];
    loop {
        if let Err(e) = fill.write_all(&block) {
            assert_eq!(e.raw_os_error(), Some(rustix::io::Errno::NOSPC.raw_os_error()));
            break;
        }
    }
    match err(s.create("x".into(), Size(MIB), None, None).await) {
        StorageError::NoSpace { message } => {
            assert!(message.contains("No space left on device"), "{message}");
            eprintln!("no_space: create on a full disk: {message}");
        }
        e => panic!("{e:?}"),
    }
    match err(s.clone_disk("src".into(), "copy".into(), false, None).await) {
        StorageError::NoSpace { .. } => {}
        e => panic!("{e:?}"),
    }
    assert!(!root.join("x").exists());
    let names: Vec<_> = s.list().await.unwrap().into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["linked", "src"]);
    assert!(temp_files(&root).is_empty(), "{:?}", temp_files(&root));
    drop(fill);
    std::fs::remove_file(root.join(".fill")).unwrap();
    s.create("x".into(), Size(MIB), None, None).await.unwrap();
}

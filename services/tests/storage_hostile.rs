//! `QemuImg` against a hostile guest: the guest writes the content of the images it uses, so
//! a raw image may come to hold a qcow2 header naming a backing file or a data file anywhere.
//! The service records formats and backing images itself and never reads them from content
//! again; its calls look up who uses what in that record instead of running qemu-img on every
//! image; and the root's images and virtual bytes are bounded.

#![allow(clippy::unwrap_used)]

use std::io::{Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

mod common;

use common::{TempDir, err};
use dombus_services::storage::{Format, QemuImg, Size, Storage, StorageConfig, StorageError};

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Writes `header` over the start of `image` as a guest writes its disk: in place, no resize.
fn guest_writes(image: &Path, header: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(header).unwrap();
    f.sync_all().unwrap();
}

/// A file outside the root: its content and modification time, to check nothing touched it.
struct Outside {
    path: PathBuf,
    content: Vec<u8>,
    mtime: SystemTime,
}

impl Outside {
    fn snapshot(path: &Path) -> Outside {
        Outside {
            path: path.to_owned(),
            content: std::fs::read(path).unwrap(),
            mtime: std::fs::metadata(path).unwrap().modified().unwrap(),
        }
    }

    fn assert_untouched(&self) {
        assert!(std::fs::read(&self.path).unwrap() == self.content, "{} was modified", self.path.display());
        assert_eq!(
            std::fs::metadata(&self.path).unwrap().modified().unwrap(),
            self.mtime,
            "{}",
            self.path.display()
        );
    }
}

#[tokio::test]
async fn a_raw_image_rewritten_with_a_qcow2_header_stays_raw() {
    let root = TempDir::new("root");
    let outside = TempDir::new("outside");
    let scratch = TempDir::new("scratch");
    let secret = outside.path("secret.raw");
    std::fs::write(&secret, vec![0x5a; MIB as usize]).unwrap();

    // The three headers a guest may write: (a) a backing file outside the root, (b) another
    // image of the root as backing, (c) an external data file outside the root.
    let hdr = |name: &str, args: &[&str]| {
        let p = scratch.path(name);
        let mut all = vec!["create", "-q", "-f", "qcow2"];
        all.extend_from_slice(args);
        all.extend([p.to_str().unwrap(), "1M"]);
        qemu_img(&all);
        std::fs::read(p).unwrap()
    };
    let data = outside.path("data");
    let data_opt = format!("data_file={}", data.display());
    let headers = [
        ("outside-backing", hdr("a", &["-u", "-b", secret.to_str().unwrap(), "-F", "raw"])),
        ("root-backing", hdr("b", &["-u", "-b", "victim", "-F", "qcow2"])),
        ("outside-data-file", hdr("c", &["-o", &data_opt])),
    ];
    std::fs::write(&data, vec![0xa5; MIB as usize]).unwrap();
    let untouched = [Outside::snapshot(&secret), Outside::snapshot(&data)];

    let s = QemuImg::new(root.0.clone(), "qemu-img".into()).unwrap();
    for (case, header) in &headers {
        let victim = s.create("victim".into(), Size(MIB), None, None).await.unwrap();
        assert_eq!(victim.format, Format::Qcow2);
        let disk = s.create("disk".into(), Size(2 * MIB), Some(Format::Raw), None).await.unwrap();
        assert_eq!((disk.format, disk.backing), (Format::Raw, None));
        guest_writes(&root.path("disk"), header);
        let written = std::fs::read(root.path("disk")).unwrap();
        assert_eq!(written.len() as u64, 2 * MIB, "{case}");

        let info = s.info("disk".into()).await.unwrap();
        assert_eq!(
            (info.format, info.backing.as_deref(), info.virtual_size),
            (Format::Raw, None, 2 * MIB),
            "{case}"
        );
        assert_eq!(s.list().await.unwrap().iter().find(|d| d.name == "disk").unwrap().format, Format::Raw);

        // Clones copy the raw bytes and nothing else: full, and full through a linked clone.
        let full = s.clone_disk("disk".into(), "full".into(), false, None).await.unwrap();
        assert_eq!((full.format, full.virtual_size), (Format::Raw, 2 * MIB), "{case}");
        assert!(
            std::fs::read(root.path("full")).unwrap() == written,
            "{case}: the full clone is not the raw bytes"
        );
        let linked = s.clone_disk("disk".into(), "linked".into(), true, None).await.unwrap();
        assert_eq!(linked.backing.as_deref(), Some("disk"), "{case}");
        s.clone_disk("linked".into(), "flat".into(), false, Some(Format::Raw)).await.unwrap();
        assert!(std::fs::read(root.path("flat")).unwrap() == written, "{case}: flattened clone differs");

        // The image its header names is no one's backing image: it may change and go.
        assert_eq!(
            s.resize("victim".into(), Size(4 * MIB), false).await.unwrap().virtual_size,
            4 * MIB,
            "{case}"
        );
        for name in ["flat", "linked", "full"] {
            s.delete(name.into()).await.unwrap();
        }
        // A resize of the rewritten image resizes the raw file, nothing its header names.
        assert_eq!(
            s.resize("disk".into(), Size(3 * MIB), false).await.unwrap().virtual_size,
            3 * MIB,
            "{case}"
        );
        assert_eq!(std::fs::metadata(root.path("disk")).unwrap().len(), 3 * MIB, "{case}");
        assert_eq!(s.resize("disk".into(), Size(MIB), true).await.unwrap().virtual_size, MIB, "{case}");
        s.delete("victim".into()).await.unwrap();
        s.delete("disk".into()).await.unwrap();
        for o in &untouched {
            o.assert_untouched();
        }
    }

    // The record survives a restart: a new storage on the root still says raw, without backing.
    s.create("victim".into(), Size(MIB), None, None).await.unwrap();
    s.create("disk".into(), Size(2 * MIB), Some(Format::Raw), None).await.unwrap();
    drop(s);
    guest_writes(&root.path("disk"), &headers[1].1);
    let s = QemuImg::new(root.0.clone(), "qemu-img".into()).unwrap();
    assert_eq!(s.qemu_img_runs(), 0, "images recorded before the restart were probed again");
    let info = s.info("disk".into()).await.unwrap();
    assert_eq!((info.format, info.backing), (Format::Raw, None));
    s.delete("victim".into()).await.unwrap();
    for o in &untouched {
        o.assert_untouched();
    }
}

/// A qcow2 image of 1 MiB, to copy into roots.
fn template(dir: &TempDir) -> PathBuf {
    let t = dir.path("template.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", t.to_str().unwrap(), "1M"]);
    t
}

#[tokio::test]
async fn calls_run_a_bounded_number_of_qemu_img_whatever_the_number_of_images() {
    const N: usize = 200;
    let root = TempDir::new("many");
    let scratch = TempDir::new("many-scratch");
    let t = template(&scratch);
    for i in 0..N {
        std::fs::copy(&t, root.path(&format!("img-{i:03}"))).unwrap();
    }
    let s = QemuImg::new(root.0.clone(), "qemu-img".into()).unwrap();
    // Adopted once at start: one qemu-img each.
    assert_eq!(s.qemu_img_runs(), N as u64);
    s.clone_disk("img-000".into(), "clone".into(), true, None).await.unwrap();

    let runs = |what: &str, before: u64| {
        let n = s.qemu_img_runs() - before;
        eprintln!("{what} with {} images: {n} qemu-img", N + 1);
        n
    };
    let before = s.qemu_img_runs();
    assert_eq!(s.list().await.unwrap().len(), N + 1);
    assert_eq!(runs("list", before), 0);

    let before = s.qemu_img_runs();
    assert!(matches!(err(s.delete("img-000".into()).await), StorageError::Busy { .. }));
    assert_eq!(runs("delete refused (backing image)", before), 0);
    let before = s.qemu_img_runs();
    s.delete("img-001".into()).await.unwrap();
    assert_eq!(runs("delete", before), 0);

    let before = s.qemu_img_runs();
    assert!(matches!(err(s.resize("img-000".into(), Size(2 * MIB), false).await), StorageError::Busy { .. }));
    assert_eq!(runs("resize refused (backing image)", before), 0);
    let before = s.qemu_img_runs();
    s.resize("img-002".into(), Size(2 * MIB), false).await.unwrap();
    assert!(runs("resize", before) <= 2);

    s.snapshot_create("img-003".into(), "s".into()).await.unwrap();
    let before = s.qemu_img_runs();
    s.snapshot_revert("img-003".into(), "s".into()).await.unwrap();
    assert!(runs("revert", before) <= 3);

    // The record survives a restart: nothing is probed again, formats and backing the same.
    let listed = s.list().await.unwrap();
    drop(s);
    let s = QemuImg::new(root.0.clone(), "qemu-img".into()).unwrap();
    assert_eq!(s.qemu_img_runs(), 0);
    let relisted = s.list().await.unwrap();
    let key = |l: &[dombus_services::storage::DiskInfo]| -> Vec<_> {
        l.iter().map(|d| (d.name.clone(), d.format, d.backing.clone(), d.virtual_size, d.snapshots)).collect()
    };
    assert_eq!(key(&relisted), key(&listed));
    assert_eq!(relisted.iter().find(|d| d.name == "clone").unwrap().backing.as_deref(), Some("img-000"));
    assert_eq!(relisted.iter().find(|d| d.name == "img-002").unwrap().virtual_size, 2 * MIB);
    assert_eq!(relisted.iter().find(|d| d.name == "img-003").unwrap().snapshots, 1);
}

#[tokio::test]
async fn the_bounds_refuse_with_their_errors_and_the_rest_goes_on() {
    let root = TempDir::new("bounds");
    let config = StorageConfig { max_images: 3, max_virtual_bytes: Some(10 * MIB), ..Default::default() };
    let s = QemuImg::with_config(root.0.clone(), "qemu-img".into(), config).unwrap();
    s.create("a".into(), Size(4 * MIB), None, None).await.unwrap();
    s.create("b".into(), Size(4 * MIB), Some(Format::Raw), None).await.unwrap();
    assert_eq!(
        err(s.create("c".into(), Size(4 * MIB), None, None).await),
        StorageError::QuotaExceeded { requested: 4 * MIB, used: 8 * MIB, limit: 10 * MIB }
    );
    assert!(matches!(
        err(s.clone_disk("a".into(), "c".into(), true, None).await),
        StorageError::QuotaExceeded { .. }
    ));
    s.create("c".into(), Size(MIB), None, None).await.unwrap();
    assert_eq!(
        err(s.create("d".into(), Size(512), None, None).await),
        StorageError::TooManyImages { limit: 3 }
    );
    assert_eq!(
        err(s.clone_disk("c".into(), "d".into(), true, None).await),
        StorageError::TooManyImages { limit: 3 }
    );
    assert_eq!(
        err(s.resize("a".into(), Size(6 * MIB), false).await),
        StorageError::QuotaExceeded { requested: 2 * MIB, used: 9 * MIB, limit: 10 * MIB }
    );
    // Nothing was left behind, and everything else works.
    assert!(!root.path("d").exists());
    assert_eq!(s.resize("a".into(), Size(5 * MIB), false).await.unwrap().virtual_size, 5 * MIB);
    assert_eq!(s.info("a".into()).await.unwrap().virtual_size, 5 * MIB);
    assert_eq!(s.list().await.unwrap().len(), 3);
    s.snapshot_create("a".into(), "s".into()).await.unwrap();
    s.delete("c".into()).await.unwrap();
    s.create("d".into(), Size(512), None, None).await.unwrap();
    assert_eq!(s.resize("b".into(), Size(MIB), true).await.unwrap().virtual_size, MIB);
    assert_eq!(
        err(s.clone_disk("b".into(), "e".into(), false, None).await),
        StorageError::TooManyImages { limit: 3 }
    );
}

//! Compiles the generated XSM/FLASK fragment with SELinux's `checkpolicy` (target `xen`) inside a
//! minimal base policy shaped like Xen's `xen.te` (its attributes, `dom0_t` and `domU_t` with
//! their channel types, and Xen's `neverallow` rules for events), then asks the compiled policy
//! (`checkpolicy -d`) which accesses it grants. Skipped, with a message, where `checkpolicy` is
//! not installed (Debian: `apt-get install checkpolicy`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use dombus_manager::xsm::{XsmInput, fragment};

const BASE_HEAD: &str = "\
class xen
class domain
class grant
class event

sid xen
sid dom0
sid domU
sid unlabeled

class xen { writeconsole }
class domain { create transition }
class grant { map_read map_write unmap transfer setup copy query }
class event { bind send status create reset }

attribute xen_type;
attribute domain_type;
attribute event_type;

type xen_t, xen_type;
type unlabeled_t, xen_type;
type dom0_t, domain_type;
type dom0_t_channel, event_type;
type_transition dom0_t domain_type:event dom0_t_channel;
type domU_t, domain_type;
type domU_t_channel, event_type;
type_transition domU_t domain_type:event domU_t_channel;

neverallow * ~domain_type:domain { create transition };
neverallow ~event_type *:event bind;
neverallow * ~event_type:event { create send status };
";

const BASE_TAIL: &str = "
role system_r;
role system_r types { xen_type domain_type };
user system_u roles { system_r };

sid xen system_u:system_r:xen_t
sid dom0 system_u:system_r:dom0_t
sid domU system_u:system_r:domU_t
sid unlabeled system_u:system_r:unlabeled_t
";

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("dombus-xsm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn have_checkpolicy() -> bool {
    match Command::new("checkpolicy").arg("-V").output() {
        Ok(out) => out.status.success(),
        Err(_) => {
            eprintln!("checkpolicy is not installed: skipping the FLASK compilation test");
            false
        }
    }
}

/// Compiles `base + fragment` into `dir/policy.bin`; the compiler's messages on failure.
fn compile(dir: &Path, fragment: &str) -> Result<PathBuf, String> {
    let conf = dir.join("policy.conf");
    let bin = dir.join("policy.bin");
    std::fs::write(&conf, format!("{BASE_HEAD}\n{fragment}{BASE_TAIL}")).expect("write");
    let out = Command::new("checkpolicy")
        .args(["-t", "xen", "-c", "30", "-o"])
        .arg(&bin)
        .arg(&conf)
        .output()
        .expect("run checkpolicy");
    if out.status.success() {
        Ok(bin)
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// Runs `checkpolicy -d` on `bin` with `script` on its standard input; its standard output.
fn debug_session(bin: &Path, script: &str) -> String {
    let mut child = Command::new("checkpolicy")
        .args(["-t", "xen", "-b", "-d"])
        .arg(bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run checkpolicy -d");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{script}q\n").as_bytes())
        .expect("write the session");
    let out = child.wait_with_output().expect("checkpolicy -d");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The answers (`sid N` or `allowed { … }`) of a debug session, in order.
fn answers(output: &str) -> Vec<String> {
    output
        .lines()
        .filter(|l| l.starts_with("sid ") || l.starts_with("allowed {"))
        .map(str::to_owned)
        .collect()
}

/// A compiled policy and the security ids of the contexts the queries use.
struct Compiled {
    bin: PathBuf,
    prefix: String,
    sids: BTreeMap<String, String>,
}

impl Compiled {
    /// Registers a context for each type (`system_r` for domains, `object_r` for channels);
    /// `checkpolicy -d` numbers them the same way in every session.
    fn new(bin: PathBuf, types: &[&str]) -> Self {
        let mut prefix = String::new();
        for t in types {
            let role = if t.ends_with("_channel") { "object_r" } else { "system_r" };
            prefix.push_str(&format!("2\nsystem_u:{role}:{t}\n"));
        }
        let got = answers(&debug_session(&bin, &prefix));
        assert_eq!(got.len(), types.len(), "contexts: {got:?}");
        let sids = types
            .iter()
            .zip(got)
            .map(|(t, a)| {
                let sid = a.strip_prefix("sid ").expect("a sid").to_owned();
                ((*t).to_owned(), sid)
            })
            .collect();
        Self { bin, prefix, sids }
    }

    fn sid(&self, t: &str) -> &str {
        &self.sids[t]
    }

    /// The permissions of class `class` that `source` has on `target`.
    fn allowed(&self, source: &str, target: &str, class: &str) -> BTreeSet<String> {
        let script = format!("{}0\n{}\n{}\n{class}\n", self.prefix, self.sid(source), self.sid(target));
        let all = answers(&debug_session(&self.bin, &script));
        let last = all.last().expect("an answer");
        let inner = last
            .strip_prefix("allowed {")
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or_else(|| panic!("not an access vector: {last}"));
        inner.split_whitespace().map(str::to_owned).collect()
    }

    /// The type of the event channel a domain of `source` creates towards `target`.
    fn channel_of(&self, source: &str, target: &str) -> String {
        let script = format!("{}3\n{}\n{}\nevent\n", self.prefix, self.sid(source), self.sid(target));
        let all = answers(&debug_session(&self.bin, &script));
        let sid = all.last().and_then(|a| a.strip_prefix("sid ")).expect("a sid");
        self.sids
            .iter()
            .find(|(_, s)| s.as_str() == sid)
            .map(|(t, _)| t.clone())
            .unwrap_or_else(|| format!("unknown sid {sid}"))
    }
}

fn set(words: &[&str]) -> BTreeSet<String> {
    words.iter().map(|&w| w.to_owned()).collect()
}

#[test]
fn fragment_compiles_and_grants_exactly_the_pairs() {
    if !have_checkpolicy() {
        return;
    }
    let input = XsmInput {
        pairs: [("storage_t", "guest_t"), ("dom0_t", "storage_t")]
            .iter()
            .map(|&(a, b)| (a.to_owned(), b.to_owned()))
            .collect(),
        types: ["dom0_t", "domU_t", "guest_t", "storage_t", "other_t"]
            .iter()
            .map(|&t| t.to_owned())
            .collect(),
        widened: vec!["a note".into()],
    };
    let text = fragment(&input).expect("fragment");
    let dir = TempDir::new("ok");
    let bin = compile(&dir.0, &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let policy = Compiled::new(
        bin,
        &[
            "guest_t",
            "storage_t",
            "other_t",
            "domU_t",
            "guest_t_channel",
            "storage_t_channel",
            "other_t_channel",
        ],
    );
    let grant = set(&["copy", "map_read", "map_write", "unmap"]);
    let none = BTreeSet::new();

    // Grants: both ways within a pair, nowhere else.
    assert_eq!(policy.allowed("guest_t", "storage_t", "grant"), grant);
    assert_eq!(policy.allowed("storage_t", "guest_t", "grant"), grant);
    assert_eq!(policy.allowed("guest_t", "other_t", "grant"), none);
    assert_eq!(policy.allowed("domU_t", "storage_t", "grant"), none);
    assert_eq!(policy.allowed("guest_t", "guest_t", "grant"), none);

    // Event channels: a guest_t domain's channel is labelled guest_t_channel; it may create and
    // signal it, and bind it to storage_t only.
    assert_eq!(policy.channel_of("guest_t", "storage_t"), "guest_t_channel");
    assert_eq!(policy.allowed("guest_t", "guest_t_channel", "event"), set(&["create", "send"]));
    assert_eq!(policy.allowed("guest_t_channel", "storage_t", "event"), set(&["bind"]));
    assert_eq!(policy.allowed("storage_t_channel", "guest_t", "event"), set(&["bind"]));
    assert_eq!(policy.allowed("guest_t_channel", "other_t", "event"), none);
    assert_eq!(policy.allowed("guest_t_channel", "domU_t", "event"), none);
    assert_eq!(policy.allowed("other_t", "other_t_channel", "event"), none);
}

#[test]
fn event_rules_between_domain_types_break_xens_neverallow() {
    if !have_checkpolicy() {
        return;
    }
    // The base is strict enough to catch event rules on domain types, the mistake the fragment
    // avoids by using channel types.
    let input = XsmInput {
        pairs: [("a_t".to_owned(), "b_t".to_owned())].into_iter().collect(),
        types: ["a_t".to_owned(), "b_t".to_owned()].into_iter().collect(),
        widened: Vec::new(),
    };
    let good = fragment(&input).expect("fragment");
    let dir = TempDir::new("bad");
    compile(&dir.0, &good).expect("the fragment compiles");
    let bad = format!("{good}allow a_t b_t:event {{ create bind send }};\n");
    let err = compile(&dir.0, &bad).expect_err("refused");
    assert!(err.contains("neverallow"), "{err}");
}

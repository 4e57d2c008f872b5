//! The audit trail: one JSON record per decision, in a size-bounded, rotated file.
//!
//! Every policy decision yields one [`AuditRecord`]. [`AuditLog::record`] writes it twice: as one
//! `info!` line with target `dombus::audit` in the manager's log, and as one JSON object on one
//! line of the audit file (`audit.jsonl`). The file is bounded: when the next line would take it
//! past [`AuditLimits::max_bytes`], it is rotated (`audit.jsonl` → `audit.jsonl.1` → … →
//! `audit.jsonl.KEEP`, the oldest dropped) and the line starts a fresh file, so a record is never
//! lost to rotation and a record larger than the bound gets a file of its own.
//!
//! Reading ([`AuditLog::tail`], [`AuditLog::find`]) treats the files as possibly damaged: a line
//! that does not parse, or that is longer than [`MAX_LINE`], is skipped and counted.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The longest line the reader accepts; a longer line is skipped as damaged. The writer never
/// writes one: it clips a record's strings first (see [`CLIPPED_FIELD`]).
pub const MAX_LINE: usize = 64 * 1024;

/// The most records [`AuditLog::tail`] returns, whatever it is asked for.
pub const MAX_TAIL: usize = 10_000;

/// The most rotated files [`AuditLimits::keep`] may ask for (each rotation renames them all).
pub const MAX_KEEP: u32 = 1_000;

/// The bytes kept of each string of a record whose line would exceed [`MAX_LINE`]. Nine strings
/// of this length, each escaped at worst six bytes per byte, stay under the line bound.
pub const CLIPPED_FIELD: usize = 1024;

/// Whether the policy let a connection through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The introduction (or the port on an existing link) was allowed.
    Allow,
    /// It was refused.
    Deny,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        })
    }
}

/// The domain that asked: it is registered, so its name and domain id are known.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party {
    /// The domain's registered name.
    pub name: String,
    /// Its domain id at the time of the decision.
    pub domid: u32,
}

/// The domain asked for: what the caller named, and what it resolved to if it exists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The registered name of the domain the request resolved to; `None` when no domain matched.
    pub name: Option<String>,
    /// Its domain id; `None` when no domain matched.
    pub domid: Option<u32>,
    /// What the caller asked for, as it asked: a name or a domain id as text.
    pub requested: String,
}

/// One policy decision, as written to the log and the audit file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When the decision was taken: RFC 3339, UTC, milliseconds (see [`rfc3339_utc`]).
    pub time: String,
    /// The decision id, also returned to a denied caller so the toolstack can look it up.
    pub decision: u64,
    /// The domain that asked.
    pub source: Party,
    /// The domain asked for.
    pub target: Target,
    /// The service as the caller named it: a registered service name, or the port as text.
    pub service: String,
    /// The port the connection is for.
    pub port: u32,
    /// The rule that decided, as `file:line`; `None` when no rule matched or none was consulted.
    pub rule: Option<String>,
    /// Allowed or denied.
    pub result: Verdict,
    /// Why, in a few words: `rule`, `no rule matched`, `no such domain`, `policy unavailable`.
    pub reason: String,
}

impl AuditRecord {
    /// Writes this record as one `info!` line with target `dombus::audit`, one field per field
    /// of the record.
    pub fn log(&self) {
        tracing::info!(
            target: "dombus::audit",
            time = %self.time,
            decision = self.decision,
            source_name = %self.source.name,
            source_domid = self.source.domid,
            target_name = self.target.name.as_deref().unwrap_or("-"),
            target_domid = ?self.target.domid,
            requested = %self.target.requested,
            service = %self.service,
            port = self.port,
            rule = self.rule.as_deref().unwrap_or("-"),
            result = %self.result,
            reason = %self.reason,
            "policy decision"
        );
    }

    /// The record as one JSON line, newline included, at most [`MAX_LINE`] bytes: a record whose
    /// line would be longer has each string clipped to [`CLIPPED_FIELD`] bytes first.
    fn to_line(&self) -> io::Result<Vec<u8>> {
        let mut line = serde_json::to_vec(self).map_err(io::Error::other)?;
        if line.len() >= MAX_LINE {
            line = serde_json::to_vec(&self.clipped()).map_err(io::Error::other)?;
        }
        line.push(b'\n');
        Ok(line)
    }

    fn clipped(&self) -> Self {
        Self {
            time: clip(&self.time),
            decision: self.decision,
            source: Party { name: clip(&self.source.name), domid: self.source.domid },
            target: Target {
                name: self.target.name.as_deref().map(clip),
                domid: self.target.domid,
                requested: clip(&self.target.requested),
            },
            service: clip(&self.service),
            port: self.port,
            rule: self.rule.as_deref().map(clip),
            result: self.result,
            reason: clip(&self.reason),
        }
    }
}

/// The first [`CLIPPED_FIELD`] bytes of `s`, cut at a character boundary.
fn clip(s: &str) -> String {
    let mut end = s.len().min(CLIPPED_FIELD);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Formats `t` as RFC 3339 in UTC with milliseconds, e.g. `2026-12-06T11:23:10.042Z`. A time
/// before 1970 is written as the epoch (the manager never decides in the past).
pub fn rfc3339_utc(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date of `days` days after 1970-01-01 (H. Hinnant's `civil_from_days`,
/// for non-negative days: eras of 400 years, years starting in March).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The size bound and rotation depth of the audit file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditLimits {
    /// The most bytes one file holds, unless a single record is larger (it then gets a file of
    /// its own). Default 8 MiB.
    pub max_bytes: u64,
    /// How many rotated files are kept besides the current one (`.1` … `.keep`); at most
    /// [`MAX_KEEP`]. Zero drops the full file at rotation. Default 4.
    pub keep: u32,
}

impl Default for AuditLimits {
    fn default() -> Self {
        Self { max_bytes: 8 * 1024 * 1024, keep: 4 }
    }
}

/// What [`AuditLog::tail`] read: the records, oldest first, and how many lines it skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditTail {
    /// The newest records, oldest first.
    pub records: Vec<AuditRecord>,
    /// Lines skipped as damaged (not a record, or longer than [`MAX_LINE`]) in the files read.
    pub skipped: u64,
}

/// The audit file and its rotated predecessors. Shared by reference between threads: appends
/// are serialised by an internal lock, and each writes one whole line with one write.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    limits: AuditLimits,
    current: Mutex<Current>,
}

/// The open current file and its length.
#[derive(Debug)]
struct Current {
    file: File,
    len: u64,
}

impl AuditLog {
    /// Opens (creating it if needed) the audit file at `path` for appending. The rotated files
    /// are `path` with `.1` … `.keep` appended.
    ///
    /// # Errors
    /// `InvalidInput` if `limits.keep` exceeds [`MAX_KEEP`]; any error opening the file.
    pub fn open(path: impl Into<PathBuf>, limits: AuditLimits) -> io::Result<Self> {
        if limits.keep > MAX_KEEP {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("audit: keep {} exceeds {MAX_KEEP}", limits.keep),
            ));
        }
        let path = path.into();
        let current = Current::open(&path)?;
        Ok(Self { path, limits, current: Mutex::new(current) })
    }

    /// The current file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The limits the log was opened with.
    pub fn limits(&self) -> AuditLimits {
        self.limits
    }

    /// Writes `record` to the log ([`AuditRecord::log`]) and appends it to the file: the log line
    /// comes first, so a decision is in the log even when the file cannot be written.
    ///
    /// # Errors
    /// As [`append`](Self::append).
    pub fn record(&self, record: &AuditRecord) -> io::Result<()> {
        record.log();
        self.append(record)
    }

    /// Appends `record` as one JSON line, with one write, rotating first if the line would take
    /// the current file past [`AuditLimits::max_bytes`].
    ///
    /// # Errors
    /// Any I/O error writing, renaming or opening a file; the log stays usable afterwards (the
    /// next append retries with the file's length as it is on disk).
    pub fn append(&self, record: &AuditRecord) -> io::Result<()> {
        let line = record.to_line()?;
        let mut current = self.lock();
        let len = line.len() as u64;
        if current.len > 0 && current.len.saturating_add(len) > self.limits.max_bytes {
            self.rotate(&mut current)?;
        }
        match current.file.write_all(&line) {
            Ok(()) => {
                current.len += len;
                Ok(())
            }
            Err(e) => {
                // A short write may have left part of the line: take the length from the disk.
                if let Ok(meta) = current.file.metadata() {
                    current.len = meta.len();
                }
                Err(e)
            }
        }
    }

    /// Moves every file one place down (the oldest is replaced) and starts an empty current file.
    fn rotate(&self, current: &mut Current) -> io::Result<()> {
        let keep = self.limits.keep;
        for i in (1..keep).rev() {
            match fs::rename(self.rotated(i), self.rotated(i + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        // The current file may be gone already if an earlier rotation failed after moving it.
        let moved =
            if keep == 0 { fs::remove_file(&self.path) } else { fs::rename(&self.path, self.rotated(1)) };
        match moved {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        *current = Current::open(&self.path)?;
        Ok(())
    }

    /// The path of the `i`-th rotated file (`i` ≥ 1), or the current file for 0.
    fn rotated(&self, i: u32) -> PathBuf {
        if i == 0 {
            return self.path.clone();
        }
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{i}"));
        PathBuf::from(name)
    }

    fn lock(&self) -> MutexGuard<'_, Current> {
        // A panic while holding the lock cannot leave `Current` inconsistent beyond a stale
        // length, which the next append tolerates: keep using it.
        self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens every existing file, newest first, under the lock, so a rotation cannot move a file
    /// between two opens; the current file is read only up to its length at this moment.
    fn snapshot(&self) -> io::Result<Vec<io::Take<File>>> {
        let current = self.lock();
        let mut files = Vec::new();
        for i in 0..=self.limits.keep {
            let file = match File::open(self.rotated(i)) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let len = if i == 0 { current.len } else { file.metadata()?.len() };
            files.push(file.take(len));
        }
        Ok(files)
    }

    /// The newest `n` records (at most [`MAX_TAIL`]) across the current and rotated files,
    /// oldest first. Damaged lines are skipped and counted, in the files that were read.
    ///
    /// # Errors
    /// An I/O error opening or reading a file (a missing file is not an error).
    pub fn tail(&self, n: usize) -> io::Result<AuditTail> {
        let n = n.min(MAX_TAIL);
        let mut out = AuditTail::default();
        let mut newest_first: Vec<VecDeque<AuditRecord>> = Vec::new();
        let mut have = 0;
        for file in self.snapshot()? {
            if have >= n {
                break;
            }
            let want = n - have;
            let mut last = VecDeque::with_capacity(want.min(1024));
            for_each_record(file, &mut out.skipped, |record| {
                if last.len() == want {
                    last.pop_front();
                }
                last.push_back(record);
            })?;
            have += last.len();
            newest_first.push(last);
        }
        out.records = newest_first.into_iter().rev().flatten().collect();
        Ok(out)
    }

    /// The record of decision `decision`, searching the newest file first (and the last match in
    /// a file), or `None`.
    ///
    /// # Errors
    /// An I/O error opening or reading a file (a missing file is not an error).
    pub fn find(&self, decision: u64) -> io::Result<Option<AuditRecord>> {
        let mut skipped = 0;
        for file in self.snapshot()? {
            let mut found = None;
            for_each_record(file, &mut skipped, |record| {
                if record.decision == decision {
                    found = Some(record);
                }
            })?;
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }
}

impl Current {
    /// Opens `path` for appending, creating it readable and writable by its owner only: the
    /// trail names domains and what they asked for.
    fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        let len = file.metadata()?.len();
        Ok(Self { file, len })
    }
}

/// Calls `f` with each record of `input` in order; a line that is longer than [`MAX_LINE`] or
/// does not parse is skipped and counted in `skipped`. An unterminated last line is parsed too
/// (a record whose newline was lost is still a record). Memory is bounded by [`MAX_LINE`].
fn for_each_record(input: impl Read, skipped: &mut u64, mut f: impl FnMut(AuditRecord)) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(64 * 1024, input);
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        let (chunk, end_of_line) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !too_long {
            if line.len() + chunk.len() > MAX_LINE {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let consumed = end_of_line.unwrap_or(buf.len());
        reader.consume(consumed);
        if end_of_line.is_some() {
            finish_line(&line, too_long, skipped, &mut f);
            line.clear();
            too_long = false;
        }
    }
    if too_long || !line.is_empty() {
        finish_line(&line, too_long, skipped, &mut f);
    }
    Ok(())
}

fn finish_line(line: &[u8], too_long: bool, skipped: &mut u64, f: &mut impl FnMut(AuditRecord)) {
    if too_long {
        *skipped += 1;
        return;
    }
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    match serde_json::from_slice::<AuditRecord>(line) {
        Ok(record) => f(record),
        Err(_) => *skipped += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// A fresh, empty directory under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "dombus-audit-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("create a temporary directory");
            Self(dir)
        }

        fn file(&self) -> PathBuf {
            self.0.join("audit.jsonl")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn record(decision: u64, reason_len: usize) -> AuditRecord {
        AuditRecord {
            time: rfc3339_utc(UNIX_EPOCH + Duration::from_millis(decision)),
            decision,
            source: Party { name: "guest-a".into(), domid: 7 },
            target: Target { name: Some("storage".into()), domid: Some(2), requested: "storage".into() },
            service: "storage".into(),
            port: 5000,
            rule: Some("30-user.policy:4".into()),
            result: Verdict::Allow,
            reason: "r".repeat(reason_len),
        }
    }

    fn line_len(r: &AuditRecord) -> u64 {
        r.to_line().expect("serialise").len() as u64
    }

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    fn decisions(records: &[AuditRecord]) -> Vec<u64> {
        records.iter().map(|r| r.decision).collect()
    }

    #[test]
    fn time_is_rfc3339_utc_with_milliseconds() {
        let at = |ms: u64| rfc3339_utc(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(1_700_000_000_042), "2023-11-14T22:13:20.042Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(951_868_799_999), "2000-02-29T23:59:59.999Z");
        assert_eq!(at(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
        assert_eq!(at(1_798_761_599_000), "2026-12-31T23:59:59.000Z");
    }

    #[test]
    fn record_is_one_json_object_with_lowercase_result() {
        let mut r = record(42, 4);
        r.result = Verdict::Deny;
        r.rule = None;
        r.target.name = None;
        r.target.domid = None;
        let line = String::from_utf8(r.to_line().expect("serialise")).expect("utf-8");
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        assert!(line.contains(r#""result":"deny""#), "{line}");
        assert!(line.contains(r#""rule":null"#), "{line}");
        let back: AuditRecord = serde_json::from_str(line.trim_end()).expect("parse");
        assert_eq!(back, r);
    }

    #[test]
    fn an_oversized_record_is_clipped_below_the_line_bound() {
        let mut r = record(1, 0);
        r.reason = "\u{1}".repeat(200_000);
        r.target.requested = "é".repeat(100_000);
        let line = r.to_line().expect("serialise");
        assert!(line.len() <= MAX_LINE, "{}", line.len());
        let back: AuditRecord = serde_json::from_slice(&line).expect("parse");
        assert_eq!(back.reason.len(), CLIPPED_FIELD);
        assert!(back.target.requested.len() <= CLIPPED_FIELD);
    }

    #[test]
    fn rotates_at_the_bound_and_keeps_keep_files() {
        let dir = TempDir::new();
        let per_line = line_len(&record(100, 10));
        // Three lines fit a file, the fourth rotates.
        let limits = AuditLimits { max_bytes: per_line * 3 + per_line / 2, keep: 2 };
        let log = AuditLog::open(dir.file(), limits).expect("open");
        for d in 100..109 {
            log.append(&record(d, 10)).expect("append");
        }
        let rotated = |i| log.rotated(i);
        let parse = |p: &Path| -> Vec<u64> {
            lines(p).iter().map(|l| serde_json::from_str::<AuditRecord>(l).expect("parse").decision).collect()
        };
        assert_eq!(parse(&rotated(2)), vec![100, 101, 102]);
        assert_eq!(parse(&rotated(1)), vec![103, 104, 105]);
        assert_eq!(parse(&dir.file()), vec![106, 107, 108]);
        for i in 0..=2 {
            assert_eq!(fs::metadata(rotated(i)).expect("stat").len(), per_line * 3);
        }
        // One more: the oldest file goes, nothing else moves out of reach.
        log.append(&record(109, 10)).expect("append");
        assert_eq!(parse(&rotated(2)), vec![103, 104, 105]);
        assert_eq!(parse(&rotated(1)), vec![106, 107, 108]);
        assert_eq!(parse(&dir.file()), vec![109]);
        assert!(!log.rotated(3).exists());
        assert_eq!(decisions(&log.tail(100).expect("tail").records), (103..110).collect::<Vec<_>>());
    }

    #[test]
    fn a_line_exactly_at_the_bound_does_not_rotate() {
        let dir = TempDir::new();
        let per_line = line_len(&record(100, 10));
        let limits = AuditLimits { max_bytes: per_line * 2, keep: 1 };
        let log = AuditLog::open(dir.file(), limits).expect("open");
        log.append(&record(100, 10)).expect("append");
        log.append(&record(101, 10)).expect("append");
        assert!(!log.rotated(1).exists());
        log.append(&record(102, 10)).expect("append");
        assert_eq!(lines(&log.rotated(1)).len(), 2);
        assert_eq!(lines(&dir.file()).len(), 1);
    }

    #[test]
    fn keep_zero_drops_the_full_file() {
        let dir = TempDir::new();
        let per_line = line_len(&record(100, 10));
        let log = AuditLog::open(dir.file(), AuditLimits { max_bytes: per_line, keep: 0 }).expect("open");
        log.append(&record(100, 10)).expect("append");
        log.append(&record(101, 10)).expect("append");
        assert!(!log.rotated(1).exists());
        assert_eq!(decisions(&log.tail(10).expect("tail").records), vec![101]);
    }

    #[test]
    fn reopening_continues_the_current_file() {
        let dir = TempDir::new();
        let per_line = line_len(&record(100, 10));
        let limits = AuditLimits { max_bytes: per_line * 2, keep: 3 };
        AuditLog::open(dir.file(), limits).expect("open").append(&record(100, 10)).expect("append");
        let log = AuditLog::open(dir.file(), limits).expect("reopen");
        log.append(&record(101, 10)).expect("append");
        log.append(&record(102, 10)).expect("append");
        assert_eq!(lines(&log.rotated(1)).len(), 2);
        assert_eq!(decisions(&log.tail(10).expect("tail").records), vec![100, 101, 102]);
    }

    #[test]
    fn tail_reads_across_files_oldest_first_and_caps_n() {
        let dir = TempDir::new();
        let per_line = line_len(&record(1000, 0));
        let log = AuditLog::open(dir.file(), AuditLimits { max_bytes: per_line * 4, keep: 4 }).expect("open");
        for d in 1000..1018 {
            log.append(&record(d, 0)).expect("append");
        }
        // 18 lines, 4 a file: .4 .3 .2 .1 full, current holds 2.
        assert_eq!(lines(&log.rotated(4)).len(), 4);
        assert_eq!(decisions(&log.tail(1).expect("tail").records), vec![1017]);
        assert_eq!(decisions(&log.tail(7).expect("tail").records), (1011..1018).collect::<Vec<_>>());
        assert_eq!(decisions(&log.tail(usize::MAX).expect("tail").records), (1000..1018).collect::<Vec<_>>());
        assert!(log.tail(0).expect("tail").records.is_empty());
    }

    #[test]
    fn tail_is_capped() {
        let dir = TempDir::new();
        let mut text = String::new();
        let one = String::from_utf8(record(0, 0).to_line().expect("line")).expect("utf-8");
        for _ in 0..MAX_TAIL + 5 {
            text.push_str(&one);
        }
        fs::write(dir.file(), text).expect("write");
        let log = AuditLog::open(dir.file(), AuditLimits::default()).expect("open");
        assert_eq!(log.tail(usize::MAX).expect("tail").records.len(), MAX_TAIL);
    }

    #[test]
    fn damaged_lines_are_skipped_and_counted() {
        let dir = TempDir::new();
        let good = |d| String::from_utf8(record(d, 3).to_line().expect("line")).expect("utf-8");
        let mut text = good(1);
        text.push_str("{\"time\": \"truncated\n");
        text.push('\n');
        text.push_str(&"x".repeat(MAX_LINE + 10));
        text.push('\n');
        text.push_str(&good(2));
        text.push_str("\u{0}\u{0}garbage\n");
        // A long line that would parse if it were not over the bound.
        let mut long = record(3, MAX_LINE);
        long.reason = "y".repeat(MAX_LINE);
        text.push_str(&serde_json::to_string(&long).expect("json"));
        text.push('\n');
        text.push_str(good(4).trim_end()); // the last newline lost
        fs::write(dir.file(), text).expect("write");
        let log = AuditLog::open(dir.file(), AuditLimits::default()).expect("open");
        let tail = log.tail(100).expect("tail");
        assert_eq!(decisions(&tail.records), vec![1, 2, 4]);
        assert_eq!(tail.skipped, 4);
        assert_eq!(log.find(2).expect("find").map(|r| r.decision), Some(2));
        assert!(log.find(3).expect("find").is_none());
    }

    #[test]
    fn find_searches_newest_first() {
        let dir = TempDir::new();
        let per_line = line_len(&record(10, 5));
        let log = AuditLog::open(dir.file(), AuditLimits { max_bytes: per_line * 2, keep: 3 }).expect("open");
        for d in 10..16 {
            log.append(&record(d, 5)).expect("append");
        }
        // The same id again, later: the newer record wins.
        let mut again = record(11, 5);
        again.result = Verdict::Deny;
        log.append(&again).expect("append");
        assert_eq!(log.find(11).expect("find"), Some(again));
        assert_eq!(log.find(10).expect("find"), Some(record(10, 5)));
        assert_eq!(log.find(99).expect("find"), None);
    }

    #[test]
    fn concurrent_appends_write_whole_lines() {
        let dir = TempDir::new();
        let log = Arc::new(
            AuditLog::open(dir.file(), AuditLimits { max_bytes: 16 * 1024, keep: MAX_KEEP }).expect("open"),
        );
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let d = t * 1000 + i;
                        log.append(&record(d, (d % 97) as usize)).expect("append");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let tail = log.tail(MAX_TAIL).expect("tail");
        assert_eq!(tail.skipped, 0);
        let mut got = decisions(&tail.records);
        got.sort_unstable();
        let mut want: Vec<u64> = (0..8u64).flat_map(|t| (0..200).map(move |i| t * 1000 + i)).collect();
        want.sort_unstable();
        assert_eq!(got, want);
        for i in 0..=MAX_KEEP {
            if let Ok(meta) = fs::metadata(log.rotated(i)) {
                assert!(meta.len() <= 16 * 1024);
            }
        }
    }

    /// A subscriber that keeps the target, level and fields of every event.
    #[derive(Clone, Default)]
    #[allow(clippy::type_complexity)]
    struct Capture(Arc<Mutex<Vec<(String, tracing::Level, Vec<(String, String)>)>>>);

    struct Fields<'a>(&'a mut Vec<(String, String)>);

    impl tracing::field::Visit for Fields<'_> {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
            self.0.push((field.name().to_owned(), format!("{value:?}")));
        }
        fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
            self.0.push((field.name().to_owned(), value.to_owned()));
        }
    }

    impl tracing::Subscriber for Capture {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            let mut fields = Vec::new();
            event.record(&mut Fields(&mut fields));
            let meta = event.metadata();
            self.0.lock().expect("capture").push((meta.target().to_owned(), *meta.level(), fields));
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn record_logs_one_info_line_with_the_fields_and_appends() {
        let dir = TempDir::new();
        let log = AuditLog::open(dir.file(), AuditLimits::default()).expect("open");
        let capture = Capture::default();
        let mut r = record(77, 2);
        r.result = Verdict::Deny;
        r.target.name = None;
        r.target.domid = None;
        r.target.requested = "12".into();
        r.rule = None;
        r.reason = "no such domain".into();
        tracing::subscriber::with_default(capture.clone(), || {
            log.record(&r).expect("record");
        });
        let events = capture.0.lock().expect("capture");
        assert_eq!(events.len(), 1);
        let (target, level, fields) = &events[0];
        assert_eq!(target, "dombus::audit");
        assert_eq!(*level, tracing::Level::INFO);
        let get = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .unwrap_or_else(|| panic!("no field {name} in {fields:?}"))
        };
        assert_eq!(get("decision"), "77");
        assert_eq!(get("time"), r.time);
        assert_eq!(get("source_name"), "guest-a");
        assert_eq!(get("source_domid"), "7");
        assert_eq!(get("target_name"), "-");
        assert_eq!(get("target_domid"), "None");
        assert_eq!(get("requested"), "12");
        assert_eq!(get("service"), "storage");
        assert_eq!(get("port"), "5000");
        assert_eq!(get("rule"), "-");
        assert_eq!(get("result"), "deny");
        assert_eq!(get("reason"), "no such domain");
        assert_eq!(log.find(77).expect("find"), Some(r));
    }

    #[test]
    fn files_are_private_to_their_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new();
        let per_line = line_len(&record(1, 0));
        let log = AuditLog::open(dir.file(), AuditLimits { max_bytes: per_line, keep: 1 }).expect("open");
        log.append(&record(1, 0)).expect("append");
        log.append(&record(2, 0)).expect("append");
        for i in 0..=1 {
            let mode = fs::metadata(log.rotated(i)).expect("stat").permissions().mode();
            assert_eq!(mode & 0o077, 0, "file {i} has mode {mode:o}");
        }
    }

    #[test]
    fn a_rotation_that_failed_after_moving_the_file_recovers() {
        let dir = TempDir::new();
        let per_line = line_len(&record(1, 0));
        let log = AuditLog::open(dir.file(), AuditLimits { max_bytes: per_line, keep: 2 }).expect("open");
        log.append(&record(1, 0)).expect("append");
        // As if a rotation had moved the file and then failed to create the new one.
        fs::rename(dir.file(), log.rotated(1)).expect("rename");
        log.append(&record(2, 0)).expect("append after the failed rotation");
        assert_eq!(decisions(&log.tail(10).expect("tail").records), vec![1, 2]);
    }

    #[test]
    fn keep_above_the_cap_is_refused() {
        let dir = TempDir::new();
        let err = AuditLog::open(dir.file(), AuditLimits { max_bytes: 1, keep: MAX_KEEP + 1 })
            .expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// For any sequence of record sizes: every file is within the bound or holds exactly one
        /// record; a rotated file was full (its successor's first line would not have fit); what
        /// is readable is, in order, a suffix of what was appended; and it holds at least the
        /// newest `keep + 1` records.
        #[test]
        fn files_stay_bounded_and_the_newest_records_stay_readable(
            sizes in proptest::collection::vec(0usize..700, 1..60),
            max_bytes in 200u64..2000,
            keep in 0u32..4,
        ) {
            let dir = TempDir::new();
            let log = AuditLog::open(dir.file(), AuditLimits { max_bytes, keep }).expect("open");
            for (d, &size) in sizes.iter().enumerate() {
                log.append(&record(d as u64, size)).expect("append");
            }
            // Newest first: the current file, then .1, .2, …
            let mut files = Vec::new();
            for i in 0..=keep {
                let p = log.rotated(i);
                if p.exists() {
                    files.push(lines(&p));
                }
            }
            prop_assert!(!log.rotated(keep + 1).exists());
            for (i, file) in files.iter().enumerate() {
                let bytes: u64 = file.iter().map(|l| l.len() as u64 + 1).sum();
                prop_assert!(bytes <= max_bytes || file.len() == 1,
                    "file {} has {} bytes in {} lines", i, bytes, file.len());
                prop_assert!(!file.is_empty());
                if i > 0 {
                    let next_first = files[i - 1][0].len() as u64 + 1;
                    prop_assert!(bytes + next_first > max_bytes, "file {} rotated early", i);
                }
            }
            let read = decisions(&log.tail(MAX_TAIL).expect("tail").records);
            let n = sizes.len() as u64;
            let first = n - read.len() as u64;
            prop_assert_eq!(&read, &(first..n).collect::<Vec<_>>());
            prop_assert!(read.len() as u64 >= (u64::from(keep) + 1).min(n));
        }
    }
}

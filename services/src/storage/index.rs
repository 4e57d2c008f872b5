//! The record of the images of a root: for each, the format and backing image the service
//! decided (when it created, cloned or adopted it), its virtual size, snapshot count and owner.
//! Kept in memory, with the map of who uses which image as its backing and what each owner
//! holds, and saved in the root as `.dombus-storage.index` (written to a temporary name,
//! synced, renamed, the directory synced).
//!
//! The file is text, one line per image after the header line `dombus-storage-index 2`:
//! `<name>\t<qcow2|raw>\t<virtual size>\t<snapshots>\t<backing name or nothing>\t<owner>`, the
//! owner `toolstack` or a domain id. A record with the header `dombus-storage-index 1` (lines of
//! the first five fields, no owner) is read too, every image the toolstack's, and written back
//! in the second form. It is the service's own file, but its parsing is bounded and total all
//! the same: at most [`MAX_INDEX_BYTES`] are read, and anything malformed is an error, never a
//! panic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Read as _, Write as _};
use std::path::Path;

use super::image::MAX_SIZE;
use super::root::check_name;
use super::{Format, Owner};

/// The record's file name in the root.
pub(crate) const INDEX_FILE: &str = ".dombus-storage.index";
/// Where a new record is written before it is renamed over [`INDEX_FILE`].
const INDEX_NEW: &str = ".dombus-storage.index.new";
/// The first line.
const HEADER: &str = "dombus-storage-index 2";
/// The first line of a record without owners (every image the toolstack's).
const HEADER_V1: &str = "dombus-storage-index 1";
/// Largest record file read (a line is at most about 180 bytes: some 370,000 images).
pub(crate) const MAX_INDEX_BYTES: u64 = 64 << 20;

/// What the service decided about one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// Its format: qemu-img is always told it, never left to probe.
    pub format: Format,
    /// The image of the root it is a linked clone of.
    pub backing: Option<String>,
    /// The size the guest sees, bytes.
    pub virtual_size: u64,
    /// Its internal snapshots.
    pub snapshots: u32,
    /// Who owns it.
    pub owner: Owner,
}

/// The records of a root, and who uses which image as backing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Index {
    images: BTreeMap<String, Record>,
    /// Backing image -> the images recorded with it as their backing.
    users: HashMap<String, BTreeSet<String>>,
    /// Sum of the virtual sizes.
    total: u128,
    /// Owner -> how many images it has and the sum of their virtual sizes.
    owned: HashMap<Owner, (usize, u128)>,
}

impl Index {
    /// The record of `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&Record> {
        self.images.get(name)
    }

    /// Every record, by name.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.images.iter()
    }

    /// How many images are recorded.
    pub(crate) fn len(&self) -> usize {
        self.images.len()
    }

    /// The sum of the recorded virtual sizes.
    pub(crate) fn total_virtual(&self) -> u128 {
        self.total
    }

    /// How many images `owner` has recorded and the sum of their virtual sizes.
    pub(crate) fn owned_by(&self, owner: Owner) -> (usize, u128) {
        self.owned.get(&owner).copied().unwrap_or_default()
    }

    /// The images recorded with `name` as their backing image.
    pub(crate) fn users_of(&self, name: &str) -> impl Iterator<Item = &String> {
        self.users.get(name).into_iter().flatten()
    }

    /// Records `name` (replacing its record).
    pub(crate) fn insert(&mut self, name: &str, record: Record) {
        self.remove(name);
        if let Some(b) = &record.backing {
            self.users.entry(b.clone()).or_default().insert(name.to_owned());
        }
        self.total += u128::from(record.virtual_size);
        let owned = self.owned.entry(record.owner).or_default();
        owned.0 += 1;
        owned.1 += u128::from(record.virtual_size);
        self.images.insert(name.to_owned(), record);
    }

    /// Forgets `name`; its record, if it had one.
    pub(crate) fn remove(&mut self, name: &str) -> Option<Record> {
        let old = self.images.remove(name)?;
        self.total -= u128::from(old.virtual_size);
        if let Some(owned) = self.owned.get_mut(&old.owner) {
            owned.0 -= 1;
            owned.1 -= u128::from(old.virtual_size);
            if owned.0 == 0 {
                self.owned.remove(&old.owner);
            }
        }
        if let Some(b) = &old.backing {
            if let Some(users) = self.users.get_mut(b) {
                users.remove(name);
                if users.is_empty() {
                    self.users.remove(b);
                }
            }
        }
        Some(old)
    }

    /// The file's text.
    pub(crate) fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.images.len() * 100);
        out.extend_from_slice(HEADER.as_bytes());
        out.push(b'\n');
        for (name, r) in &self.images {
            let owner = match r.owner {
                Owner::Toolstack => "toolstack".to_owned(),
                Owner::Domain(d) => d.to_string(),
            };
            let line = format!(
                "{name}\t{}\t{}\t{}\t{}\t{owner}\n",
                r.format.as_str(),
                r.virtual_size,
                r.snapshots,
                r.backing.as_deref().unwrap_or("")
            );
            out.extend_from_slice(line.as_bytes());
        }
        out
    }

    /// Parses the file's text; why it is not a record, if it is not.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Index, String> {
        if bytes.len() as u64 > MAX_INDEX_BYTES {
            return Err(format!("longer than {MAX_INDEX_BYTES} bytes"));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
        let mut lines = text.split_terminator('\n');
        let with_owners = match lines.next() {
            Some(HEADER) => true,
            Some(HEADER_V1) => false,
            _ => return Err(format!("the first line is neither {HEADER:?} nor {HEADER_V1:?}")),
        };
        let mut index = Index::default();
        for (n, line) in lines.enumerate() {
            let at = n + 2;
            let fields: Vec<&str> = line.split('\t').collect();
            let (name, format, size, snapshots, backing, owner) = match (with_owners, &fields[..]) {
                (true, [name, format, size, snapshots, backing, owner]) => {
                    (*name, *format, *size, *snapshots, *backing, parse_owner(owner))
                }
                (false, [name, format, size, snapshots, backing]) => {
                    (*name, *format, *size, *snapshots, *backing, Some(Owner::Toolstack))
                }
                _ => {
                    let n = if with_owners { 6 } else { 5 };
                    return Err(format!("line {at}: not {n} tab-separated fields"));
                }
            };
            let owner = owner.ok_or_else(|| format!("line {at}: bad owner"))?;
            check_name(name).map_err(|e| format!("line {at}: {e}"))?;
            let format = match format {
                "qcow2" => Format::Qcow2,
                "raw" => Format::Raw,
                other => return Err(format!("line {at}: unknown format {other:?}")),
            };
            let virtual_size = size
                .parse::<u64>()
                .ok()
                .filter(|s| *s <= MAX_SIZE)
                .ok_or_else(|| format!("line {at}: bad virtual size {size:?}"))?;
            let snapshots = snapshots.parse::<u32>().map_err(|_| format!("line {at}: bad snapshot count"))?;
            let backing = match backing {
                "" => None,
                b => {
                    check_name(b).map_err(|e| format!("line {at}: backing: {e}"))?;
                    if format == Format::Raw {
                        return Err(format!("line {at}: a raw image with a backing image"));
                    }
                    if b == name {
                        return Err(format!("line {at}: {name:?} is its own backing image"));
                    }
                    Some(b.to_owned())
                }
            };
            if index.images.contains_key(name) {
                return Err(format!("line {at}: {name:?} recorded twice"));
            }
            index.insert(name, Record { format, backing, virtual_size, snapshots, owner });
        }
        Ok(index)
    }

    /// Reads the record of `root`: `None` if it has none yet.
    pub(crate) fn load(root: &Path) -> io::Result<Option<Index>> {
        let path = root.join(INDEX_FILE);
        let file = match std::fs::OpenOptions::new().read(true).custom_flags_nofollow().open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        file.take(MAX_INDEX_BYTES + 1).read_to_end(&mut bytes)?;
        Index::parse(&bytes).map(Some).map_err(|why| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the image record {} is damaged ({why}); repair it, or remove it to adopt every \
                     image again from its current content (only if no guest could have written them)",
                    path.display()
                ),
            )
        })
    }

    /// Saves the record in `root`: a temporary file, synced, renamed over the old, the
    /// directory synced.
    pub(crate) fn save(&self, root: &Path) -> io::Result<()> {
        let new = root.join(INDEX_NEW);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags_nofollow()
            .open(&new)?;
        f.write_all(&self.serialize())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&new, root.join(INDEX_FILE))?;
        std::fs::File::open(root)?.sync_all()
    }
}

/// An owner as the record writes it: `toolstack` or a domain id in decimal.
fn parse_owner(text: &str) -> Option<Owner> {
    match text {
        "toolstack" => Some(Owner::Toolstack),
        d if !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) => d.parse().ok().map(Owner::Domain),
        _ => None,
    }
}

trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for std::fs::OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt as _;
        self.custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    fn rec(format: Format, backing: Option<&str>, size: u64) -> Record {
        Record {
            format,
            backing: backing.map(str::to_owned),
            virtual_size: size,
            snapshots: 0,
            owner: Owner::Toolstack,
        }
    }

    #[test]
    fn round_trips_and_tracks_users() {
        let mut i = Index::default();
        i.insert("base", rec(Format::Raw, None, 1 << 20));
        i.insert("a", rec(Format::Qcow2, Some("base"), 1 << 20));
        i.insert("b", Record { snapshots: 3, ..rec(Format::Qcow2, Some("base"), 2 << 20) });
        assert_eq!(i.users_of("base").collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(i.total_virtual(), 4 << 20);
        let parsed = Index::parse(&i.serialize()).unwrap();
        assert_eq!(parsed, i);
        i.remove("a");
        i.insert("b", rec(Format::Qcow2, None, 1 << 20));
        assert_eq!(i.users_of("base").count(), 0);
        assert_eq!(i.total_virtual(), 2 << 20);
        assert!(i.users.is_empty());
    }

    /// Each owner's images and bytes follow inserts, replacements and removals, and the owner
    /// survives the file.
    #[test]
    fn tracks_what_each_owner_holds() {
        let mut i = Index::default();
        i.insert("t", rec(Format::Raw, None, 1 << 20));
        i.insert("a", Record { owner: Owner::Domain(7), ..rec(Format::Qcow2, None, 2 << 20) });
        i.insert("b", Record { owner: Owner::Domain(7), ..rec(Format::Qcow2, Some("a"), 3 << 20) });
        i.insert("c", Record { owner: Owner::Domain(4_000_000_000), ..rec(Format::Raw, None, 512) });
        assert_eq!(i.owned_by(Owner::Domain(7)), (2, 5 << 20));
        assert_eq!(i.owned_by(Owner::Toolstack), (1, 1 << 20));
        assert_eq!(i.owned_by(Owner::Domain(8)), (0, 0));
        let text = String::from_utf8(i.serialize()).unwrap();
        assert!(text.starts_with("dombus-storage-index 2\n"), "{text}");
        assert!(text.contains("b\tqcow2\t3145728\t0\ta\t7\n") && text.contains("\ttoolstack\n"), "{text}");
        assert_eq!(Index::parse(text.as_bytes()).unwrap(), i);
        i.insert("b", Record { owner: Owner::Domain(7), ..rec(Format::Qcow2, None, 1 << 20) });
        assert_eq!(i.owned_by(Owner::Domain(7)), (2, 3 << 20));
        i.remove("a");
        i.remove("b");
        assert_eq!(i.owned_by(Owner::Domain(7)), (0, 0));
        assert!(!i.owned.contains_key(&Owner::Domain(7)));
    }

    /// A record written before images had owners loads, every image the toolstack's.
    #[test]
    fn reads_records_without_owners_as_the_toolstacks() {
        let old = "dombus-storage-index 1\nbase\traw\t1048576\t0\t\nvm\tqcow2\t2097152\t1\tbase\n";
        let i = Index::parse(old.as_bytes()).unwrap();
        assert_eq!(i.len(), 2);
        assert!(i.iter().all(|(_, r)| r.owner == Owner::Toolstack));
        assert_eq!(i.owned_by(Owner::Toolstack), (2, 3 << 20));
        assert_eq!(i.get("vm").unwrap().backing.as_deref(), Some("base"));
        // A line of the new form under the old header, and the reverse, are refused.
        assert!(Index::parse(b"dombus-storage-index 1\na\traw\t512\t0\t\t7\n").is_err());
        assert!(Index::parse(b"dombus-storage-index 2\na\traw\t512\t0\t\n").is_err());
    }

    #[test]
    fn refuses_malformed_records() {
        for bad in [
            "",
            "dombus-storage-index 3\n",
            "dombus-storage-index 2\na\traw\t512\t0\t\t\n",
            "dombus-storage-index 2\na\traw\t512\t0\t\t-1\n",
            "dombus-storage-index 2\na\traw\t512\t0\t\t+7\n",
            "dombus-storage-index 2\na\traw\t512\t0\t\t4294967296\n",
            "dombus-storage-index 2\na\traw\t512\t0\t\tdom0\n",
            "dombus-storage-index 2\na\traw\t512\t0\t\t7\tx\n",
            "dombus-storage-index 1\na\tqcow2\t512\t0\n",
            "dombus-storage-index 1\na\tvmdk\t512\t0\t\n",
            "dombus-storage-index 1\n../a\traw\t512\t0\t\n",
            "dombus-storage-index 1\na\traw\t-1\t0\t\n",
            "dombus-storage-index 1\na\traw\t512\t0\tb\n",
            "dombus-storage-index 1\na\tqcow2\t512\t0\ta\n",
            "dombus-storage-index 1\na\tqcow2\t512\t0\t/etc/passwd\n",
            "dombus-storage-index 1\na\traw\t512\t0\t\na\traw\t512\t0\t\n",
            "dombus-storage-index 1\na\traw\t99999999999999999999\t0\t\n",
        ] {
            assert!(Index::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert_eq!(Index::parse(b"dombus-storage-index 1\n").unwrap().len(), 0);
    }

    proptest! {
        #[test]
        fn parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Index::parse(&bytes);
        }

        #[test]
        fn parsing_near_valid_lines_never_panics(
            lines in proptest::collection::vec(
                "[a-c]{0,2}\t(qcow2|raw|x)\t[0-9]{0,21}\t[0-9-]{0,11}\t[a-c./]{0,2}(\t(toolstack|[0-9+-]{0,11}))?",
                0..8,
            ),
            v1 in any::<bool>(),
        ) {
            let header = if v1 { HEADER_V1 } else { HEADER };
            let text = format!("{header}\n{}", lines.join("\n"));
            if let Ok(i) = Index::parse(text.as_bytes()) {
                prop_assert_eq!(Index::parse(&i.serialize()).unwrap(), i);
            }
        }
    }
}

//! The XSM/FLASK fragment that lets exactly the allowed pairs of domain types share grants and event channels.
//!
//! The manager decides which domains are *introduced*; only the hypervisor can stop two guests
//! that cooperate from sharing memory or signalling each other directly. [`fragment`] turns the
//! set of domain-type pairs the policy allows into a type-enforcement (`.te`) module for Xen's
//! FLASK policy (`tools/flask/policy/modules/`), granting per unordered pair what Xen's
//! `domain_comms(a, b)` macro grants, and nothing else:
//!
//! - grants, both ways: `allow a b:grant { copy map_read map_write unmap };` (the mapping or
//!   copying domain is the subject, the granting domain the object);
//! - event channels, both ways: Xen labels a channel that a domain of type `a` creates with
//!   `a_channel` (a `type_transition` on class `event`), checks `create` and `send` against that
//!   channel type and `bind` from the channel type to the remote domain's type. So the fragment
//!   allows `a a_channel:event { create send }` for each type in a pair and
//!   `a_channel b:event bind` plus `b_channel a:event bind` for the pair. Writing
//!   `allow a b:event …` instead would break Xen's own `neverallow` rules (events must use
//!   `event_type`) and grant nothing.
//!
//! The module is plain statements (no m4 macros), so it compiles inside Xen's policy tree and on
//! its own after a minimal base. [`BASE_TYPES`] lists the domain types Xen's example policy
//! declares; every other type gets its declaration here: the type (attribute `domain_type`), its
//! channel type (attribute `event_type`) and the channel `type_transition`.

use std::collections::BTreeSet;
use std::fmt::Write as _;

/// The domain types declared by the modules of Xen's example FLASK policy
/// (`tools/flask/policy/modules`: `xen`, `domU`, `isolated_domU`, `prot_domU`, `nomigrate`,
/// `xenstore`), each with its `_channel` type. The fragment does not declare these again.
pub const BASE_TYPES: [&str; 7] =
    ["dm_dom_t", "dom0_t", "domU_t", "isolated_domU_t", "nomigrate_t", "prot_domU_t", "xenstore_t"];

/// Types of Xen itself (the hypervisor, pseudo-domains, unlabeled objects and devices): never
/// domain types, refused as such.
pub const XEN_TYPES: [&str; 9] =
    ["device_t", "domio_t", "domxen_t", "iomem_t", "ioport_t", "irq_t", "security_t", "unlabeled_t", "xen_t"];

/// The longest FLASK type name the fragment accepts, in bytes.
pub const MAX_TYPE_LEN: usize = 64;

/// The longest note passed through into the header, in bytes.
pub const MAX_NOTE_LEN: usize = 1024;

/// The grant permissions allowed each way between the types of a pair.
const GRANT_PERMS: &str = "{ copy map_read map_write unmap }";

/// What the fragment is generated from: computed from the policy over the registered domains.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XsmInput {
    /// The pairs of FLASK domain types (e.g. `storage_t`) the policy allows to be introduced. A
    /// pair is unordered: `(a, b)` and `(b, a)` mean the same and yield the same rules.
    pub pairs: BTreeSet<(String, String)>,
    /// Every domain type known; each type of a pair must be one of them. Types that are not in
    /// [`BASE_TYPES`] are declared by the fragment, also those in no pair.
    pub types: BTreeSet<String>,
    /// Notes on where the policy was widened to fit types (one line each, written into the
    /// header as comments).
    pub widened: Vec<String>,
}

/// Why a fragment or a type name could not be produced.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum XsmError {
    /// A FLASK type name that is not `[a-z][a-z0-9_]*_t` of at most [`MAX_TYPE_LEN`] bytes (nor
    /// one of [`BASE_TYPES`]), or is a type of Xen itself.
    #[error("invalid FLASK domain type {name:?}: {why}")]
    InvalidType {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A dombus `@type:` label that cannot be mapped to a FLASK type.
    #[error("domain type label {label:?} has no FLASK type: {why}")]
    InvalidLabel {
        /// The label as given.
        label: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A pair names a type that is not in [`XsmInput::types`].
    #[error("the pair ({a}, {b}) names {missing}, which is not among the known domain types")]
    UnknownType {
        /// The pair's first type.
        a: String,
        /// The pair's second type.
        b: String,
        /// The one that is missing.
        missing: String,
    },
    /// A note that cannot be written as one comment line.
    #[error("note {index} cannot be written into the header: {why}")]
    InvalidNote {
        /// Its index in [`XsmInput::widened`].
        index: usize,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Maps a dombus `@type:` label to its FLASK type: `-` becomes `_` and `_t` is appended
/// (`guest` → `guest_t`, `service-domain` → `service_domain_t`, `storage` → `storage_t`).
///
/// # Errors
/// [`XsmError::InvalidLabel`] unless the label is `[a-z][a-z0-9_-]*` and the type fits in
/// [`MAX_TYPE_LEN`] bytes; [`XsmError::InvalidType`] if it maps to a type of Xen itself (`xen`).
pub fn flask_type(domain_type_label: &str) -> Result<String, XsmError> {
    let bad = |why| XsmError::InvalidLabel { label: domain_type_label.to_owned(), why };
    let mut bytes = domain_type_label.bytes();
    match bytes.next() {
        None => return Err(bad("empty")),
        Some(b'a'..=b'z') => {}
        Some(_) => return Err(bad("must start with a lowercase letter")),
    }
    if !bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-')) {
        return Err(bad("only a-z, 0-9, '_' and '-' are allowed"));
    }
    if domain_type_label.len() + 2 > MAX_TYPE_LEN {
        return Err(bad("too long for a FLASK type"));
    }
    let name = format!("{}_t", domain_type_label.replace('-', "_"));
    validate_type(&name)?;
    Ok(name)
}

/// Checks a FLASK domain type name: one of [`BASE_TYPES`], or `[a-z][a-z0-9_]*_t` of at most
/// [`MAX_TYPE_LEN`] bytes and not one of [`XEN_TYPES`].
///
/// # Errors
/// [`XsmError::InvalidType`] saying which rule the name breaks.
pub fn validate_type(name: &str) -> Result<(), XsmError> {
    let bad = |why| XsmError::InvalidType { name: name.to_owned(), why };
    if BASE_TYPES.contains(&name) {
        return Ok(());
    }
    if name.len() > MAX_TYPE_LEN {
        return Err(bad("longer than 64 bytes"));
    }
    let Some(stem) = name.strip_suffix("_t") else {
        return Err(bad("must end in \"_t\""));
    };
    match stem.bytes().next() {
        None => return Err(bad("nothing before \"_t\"")),
        Some(b'a'..=b'z') => {}
        Some(_) => return Err(bad("must start with a lowercase letter")),
    }
    if !stem.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_')) {
        return Err(bad("only a-z, 0-9 and '_' are allowed"));
    }
    if XEN_TYPES.contains(&name) {
        return Err(bad("a type of Xen itself, not a domain type"));
    }
    Ok(())
}

/// Writes the `.te` fragment for `input`: a header comment (what it grants, what it does not,
/// the base types, the notes), the declarations of the types not in [`BASE_TYPES`], and per
/// unordered pair the grant and event-channel rules both ways. The output depends only on the
/// sets, so it is the same for the same policy (sorted, no time stamp).
///
/// # Errors
/// [`XsmError::InvalidType`] for a bad type name, [`XsmError::UnknownType`] for a pair naming a
/// type not in `input.types`, [`XsmError::InvalidNote`] for a note with a control character or
/// longer than [`MAX_NOTE_LEN`].
pub fn fragment(input: &XsmInput) -> Result<String, XsmError> {
    for name in &input.types {
        validate_type(name)?;
    }
    let mut pairs = BTreeSet::new();
    for (a, b) in &input.pairs {
        for name in [a, b] {
            validate_type(name)?;
            if !input.types.contains(name) {
                return Err(XsmError::UnknownType { a: a.clone(), b: b.clone(), missing: name.clone() });
            }
        }
        pairs.insert(if a <= b { (a, b) } else { (b, a) });
    }
    for (index, note) in input.widened.iter().enumerate() {
        if note.len() > MAX_NOTE_LEN {
            return Err(XsmError::InvalidNote { index, why: "longer than 1024 bytes" });
        }
        if note.chars().any(char::is_control) {
            return Err(XsmError::InvalidNote {
                index,
                why: "contains a control character (a line break would end the comment)",
            });
        }
    }
    let declared: Vec<&String> = input.types.iter().filter(|t| !BASE_TYPES.contains(&t.as_str())).collect();
    let communicating: BTreeSet<&String> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();

    let mut out = String::new();
    header(&mut out, input, &declared, pairs.len());

    if !declared.is_empty() {
        out.push_str("\n# Domain types not in the base policy, each with its event-channel type.\n");
        for t in &declared {
            let _ = writeln!(out, "type {t}, domain_type;");
            let _ = writeln!(out, "type {t}_channel, event_type;");
            let _ = writeln!(out, "type_transition {t} domain_type:event {t}_channel;");
        }
    }
    if !communicating.is_empty() {
        out.push_str(
            "\n# Each type in a pair creates and signals its own channels; the bind rules below\n\
             # decide to which domains a channel may lead.\n",
        );
        for t in &communicating {
            let _ = writeln!(out, "allow {t} {t}_channel:event {{ create send }};");
        }
    }
    for (a, b) in &pairs {
        let _ = writeln!(out, "\n# {a} <-> {b}");
        if a == b {
            let _ = writeln!(out, "allow {a} {a}:grant {GRANT_PERMS};");
            let _ = writeln!(out, "allow {a}_channel {a}:event bind;");
        } else {
            let _ = writeln!(out, "allow {a} {b}:grant {GRANT_PERMS};");
            let _ = writeln!(out, "allow {b} {a}:grant {GRANT_PERMS};");
            let _ = writeln!(out, "allow {a}_channel {b}:event bind;");
            let _ = writeln!(out, "allow {b}_channel {a}:event bind;");
        }
    }
    Ok(out)
}

/// The header comment: what the fragment is, what it grants and does not, and its inputs.
fn header(out: &mut String, input: &XsmInput, declared: &[&String], pairs: usize) {
    out.push_str(
        "# XSM/FLASK policy fragment generated by dombus (`dombus policy xsm`) from the\n\
         # connection manager's policy. Regenerate it when the policy changes; do not edit it.\n\
         #\n\
         # Grants, for each pair of domain types listed below and both ways, what Xen's\n\
         # domain_comms macro grants: mapping and copying the other's grants\n\
         # (grant { copy map_read map_write unmap }) and event channels between them\n\
         # (event { create send } on a type's own channel type, event bind from it to the other\n\
         # type). A pair of a type with itself lets different domains of that type communicate.\n\
         #\n\
         # Does not grant anything else: no pair not listed, no domain creation, management,\n\
         # migration or device access (the site policy's create_domain and manage_domain rules,\n\
         # also for the types declared here), no role (Xen's all_system_role module gives\n\
         # system_r every domain_type). Does not take away what the base policy allows: Xen's\n\
         # example policy lets domU_t share with domU_t and dom0_t, so guests kept apart need\n\
         # types of their own. The connection manager still decides introductions, and the\n\
         # store permissions the rendezvous; this fragment stops two guests that cooperate\n\
         # from sharing memory or events the policy does not allow.\n\
         #\n\
         # Base types, declared by Xen's policy modules and not here:\n#  ",
    );
    for t in BASE_TYPES {
        out.push(' ');
        out.push_str(t);
    }
    out.push_str("\n# Types declared here:");
    if declared.is_empty() {
        out.push_str(" none");
    }
    for t in declared {
        out.push(' ');
        out.push_str(t);
    }
    let _ = write!(out, "\n# Pairs: {pairs}\n");
    if !input.widened.is_empty() {
        out.push_str("#\n# Where the policy was widened to fit domain types:\n");
        for note in &input.widened {
            let _ = writeln!(out, "#   {note}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(pairs: &[(&str, &str)], types: &[&str]) -> XsmInput {
        XsmInput {
            pairs: pairs.iter().map(|&(a, b)| (a.to_owned(), b.to_owned())).collect(),
            types: types.iter().map(|&t| t.to_owned()).collect(),
            widened: Vec::new(),
        }
    }

    const GOLDEN: &str = "\
# XSM/FLASK policy fragment generated by dombus (`dombus policy xsm`) from the
# connection manager's policy. Regenerate it when the policy changes; do not edit it.
#
# Grants, for each pair of domain types listed below and both ways, what Xen's
# domain_comms macro grants: mapping and copying the other's grants
# (grant { copy map_read map_write unmap }) and event channels between them
# (event { create send } on a type's own channel type, event bind from it to the other
# type). A pair of a type with itself lets different domains of that type communicate.
#
# Does not grant anything else: no pair not listed, no domain creation, management,
# migration or device access (the site policy's create_domain and manage_domain rules,
# also for the types declared here), no role (Xen's all_system_role module gives
# system_r every domain_type). Does not take away what the base policy allows: Xen's
# example policy lets domU_t share with domU_t and dom0_t, so guests kept apart need
# types of their own. The connection manager still decides introductions, and the
# store permissions the rendezvous; this fragment stops two guests that cooperate
# from sharing memory or events the policy does not allow.
#
# Base types, declared by Xen's policy modules and not here:
#   dm_dom_t dom0_t domU_t isolated_domU_t nomigrate_t prot_domU_t xenstore_t
# Types declared here: guest_t storage_t
# Pairs: 3
#
# Where the policy was widened to fit domain types:
#   rule 30-user.policy:2 names domain web; applied to its type guest_t

# Domain types not in the base policy, each with its event-channel type.
type guest_t, domain_type;
type guest_t_channel, event_type;
type_transition guest_t domain_type:event guest_t_channel;
type storage_t, domain_type;
type storage_t_channel, event_type;
type_transition storage_t domain_type:event storage_t_channel;

# Each type in a pair creates and signals its own channels; the bind rules below
# decide to which domains a channel may lead.
allow dom0_t dom0_t_channel:event { create send };
allow guest_t guest_t_channel:event { create send };
allow storage_t storage_t_channel:event { create send };

# dom0_t <-> storage_t
allow dom0_t storage_t:grant { copy map_read map_write unmap };
allow storage_t dom0_t:grant { copy map_read map_write unmap };
allow dom0_t_channel storage_t:event bind;
allow storage_t_channel dom0_t:event bind;

# guest_t <-> guest_t
allow guest_t guest_t:grant { copy map_read map_write unmap };
allow guest_t_channel guest_t:event bind;

# guest_t <-> storage_t
allow guest_t storage_t:grant { copy map_read map_write unmap };
allow storage_t guest_t:grant { copy map_read map_write unmap };
allow guest_t_channel storage_t:event bind;
allow storage_t_channel guest_t:event bind;
";

    #[test]
    fn golden_output_for_a_small_input() {
        let mut i = input(
            &[("storage_t", "guest_t"), ("dom0_t", "storage_t"), ("guest_t", "guest_t")],
            &["dom0_t", "guest_t", "storage_t"],
        );
        i.widened.push("rule 30-user.policy:2 names domain web; applied to its type guest_t".into());
        let got = fragment(&i).expect("fragment");
        assert_eq!(got, GOLDEN, "got:\n{got}");
    }

    #[test]
    fn no_pairs_declares_types_and_grants_nothing() {
        let got = fragment(&input(&[], &["domU_t", "lonely_t"])).expect("fragment");
        assert!(got.contains("type lonely_t, domain_type;"));
        assert!(!got.contains("type domU_t"));
        assert!(!got.lines().any(|l| l.starts_with("allow")), "{got}");
        assert!(got.contains("# Pairs: 0\n"));
    }

    /// The `allow` lines of a fragment, as a set.
    fn allows(text: &str) -> BTreeSet<String> {
        text.lines().filter(|l| l.starts_with("allow ")).map(str::to_owned).collect()
    }

    #[test]
    fn pairs_are_symmetric() {
        let types = ["a_t", "b_t", "c_t"];
        let one = fragment(&input(&[("a_t", "b_t"), ("c_t", "a_t")], &types)).expect("fragment");
        let other = fragment(&input(&[("b_t", "a_t"), ("a_t", "c_t")], &types)).expect("fragment");
        let both =
            fragment(&input(&[("a_t", "b_t"), ("b_t", "a_t"), ("a_t", "c_t"), ("c_t", "a_t")], &types))
                .expect("fragment");
        assert_eq!(one, other);
        let rules = allows(&one);
        assert_eq!(rules, allows(&both));
        // Every grant and bind rule has its mirror, and nothing joins b_t and c_t.
        for rule in &rules {
            let words: Vec<&str> = rule.split_whitespace().collect();
            let (subject, object) = (words[1], words[2].split(':').next().expect("class"));
            if rule.contains(":grant") {
                assert!(rules.contains(&rule.replacen(
                    &format!("{subject} {object}"),
                    &format!("{object} {subject}"),
                    1
                )));
            }
            if rule.ends_with(":event bind;") {
                let s = subject.trim_end_matches("_channel");
                let mirror = format!("allow {object}_channel {s}:event bind;");
                assert!(rules.contains(&mirror), "{rule} has no mirror");
            }
            assert!(!(rule.contains("b_t") && rule.contains("c_t")), "{rule}");
        }
        assert_eq!(rules.len(), 3 + 2 * 4);
    }

    #[test]
    fn output_is_deterministic() {
        let types = ["x_t", "y_t", "z_t", "domU_t"];
        let pairs = [("z_t", "x_t"), ("domU_t", "y_t"), ("y_t", "y_t")];
        let first = fragment(&input(&pairs, &types)).expect("fragment");
        let mut reversed = pairs;
        reversed.reverse();
        for _ in 0..3 {
            assert_eq!(fragment(&input(&reversed, &types)).expect("fragment"), first);
        }
    }

    #[test]
    fn type_names_are_validated() {
        let err = |name: &str| match validate_type(name) {
            Err(XsmError::InvalidType { why, .. }) => why,
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(err("storage"), "must end in \"_t\"");
        assert_eq!(err("_t"), "nothing before \"_t\"");
        assert_eq!(err("Storage_t"), "must start with a lowercase letter");
        assert_eq!(err("9lives_t"), "must start with a lowercase letter");
        assert_eq!(err("stor-age_t"), "only a-z, 0-9 and '_' are allowed");
        assert_eq!(err("a b_t"), "only a-z, 0-9 and '_' are allowed");
        assert_eq!(err("x_t;\nallow x_t"), "only a-z, 0-9 and '_' are allowed");
        assert_eq!(err("domu_T"), "must end in \"_t\"");
        assert_eq!(err("xen_t"), "a type of Xen itself, not a domain type");
        assert_eq!(err(&format!("{}_t", "a".repeat(63))), "longer than 64 bytes");
        validate_type(&format!("{}_t", "a".repeat(62))).expect("64 bytes");
        validate_type("domU_t").expect("base type");
        validate_type("a_t").expect("shortest");
        validate_type("guest_2_t").expect("digits and underscores");
    }

    #[test]
    fn fragment_reports_bad_inputs() {
        assert_eq!(
            fragment(&input(&[], &["ok_t", "Bad_t"])),
            Err(XsmError::InvalidType { name: "Bad_t".into(), why: "must start with a lowercase letter" })
        );
        assert_eq!(
            fragment(&input(&[("a_t", "b_t")], &["a_t"])),
            Err(XsmError::UnknownType { a: "a_t".into(), b: "b_t".into(), missing: "b_t".into() })
        );
        let mut i = input(&[], &["a_t"]);
        i.widened = vec!["fine".into(), "two\nlines".into()];
        assert!(matches!(fragment(&i), Err(XsmError::InvalidNote { index: 1, .. })));
        i.widened = vec!["n".repeat(MAX_NOTE_LEN + 1)];
        assert!(matches!(fragment(&i), Err(XsmError::InvalidNote { index: 0, .. })));
        let msg = fragment(&input(&[("a_t", "b c_t")], &["a_t"])).expect_err("bad").to_string();
        assert_eq!(msg, "invalid FLASK domain type \"b c_t\": only a-z, 0-9 and '_' are allowed");
    }

    #[test]
    fn labels_map_to_flask_types() {
        assert_eq!(flask_type("guest").expect("guest"), "guest_t");
        assert_eq!(flask_type("service-domain").expect("service-domain"), "service_domain_t");
        assert_eq!(flask_type("net2").expect("net2"), "net2_t");
        let why = |label: &str| match flask_type(label) {
            Err(XsmError::InvalidLabel { why, .. }) => why,
            other => panic!("{label}: {other:?}"),
        };
        assert_eq!(why(""), "empty");
        assert_eq!(why("Guest"), "must start with a lowercase letter");
        assert_eq!(why("-guest"), "must start with a lowercase letter");
        assert_eq!(why("gu est"), "only a-z, 0-9, '_' and '-' are allowed");
        assert_eq!(why("guest:x"), "only a-z, 0-9, '_' and '-' are allowed");
        assert_eq!(why("gäst"), "only a-z, 0-9, '_' and '-' are allowed");
        assert_eq!(why(&"a".repeat(63)), "too long for a FLASK type");
        assert_eq!(flask_type(&"a".repeat(62)).expect("fits").len(), 64);
        assert!(matches!(flask_type("xen"), Err(XsmError::InvalidType { .. })));
    }
}

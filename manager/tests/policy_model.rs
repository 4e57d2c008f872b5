//! Property tests of the policy: `Policy::decide` against a plain re-statement of the matching
//! rules, and a rule's text parsing back to the same rule.

use dombus_manager::policy::{Action, DomainView, Name, Origin, Policy, Rule, Service, ServiceRef, Subject};
use proptest::prelude::*;

/// A domain of the model: what `DomainView` borrows.
#[derive(Clone, Debug)]
struct Domain {
    name: String,
    type_: Option<String>,
    tags: Vec<String>,
    backend: bool,
    toolstack: bool,
}

impl Domain {
    fn view(&self) -> DomainView<'_> {
        DomainView {
            name: &self.name,
            type_: self.type_.as_deref(),
            tags: &self.tags,
            backend: self.backend,
            toolstack: self.toolstack,
        }
    }
}

/// The model's rule: the four tokens as written.
#[derive(Clone, Debug)]
struct TextRule {
    service: String,
    source: String,
    target: String,
    action: &'static str,
}

// Small alphabets, so that rules and connections meet often.
const NAMES: &[&str] = &["a", "b", "c"];
const LABELS: &[&str] = &["x", "y"];
const SERVICE_NAMES: &[&str] = &["s1", "s2"];

fn subject_token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*".to_string()),
        Just("@anyvm".to_string()),
        Just("@backend".to_string()),
        Just("@toolstack".to_string()),
        prop::sample::select(LABELS).prop_map(|t| format!("@tag:{t}")),
        prop::sample::select(LABELS).prop_map(|t| format!("@type:{t}")),
        prop::sample::select(NAMES).prop_map(str::to_string),
    ]
}

fn service_token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*".to_string()),
        (1u32..4).prop_map(|p| p.to_string()),
        prop::sample::select(SERVICE_NAMES).prop_map(str::to_string),
    ]
}

fn text_rule() -> impl Strategy<Value = TextRule> {
    (service_token(), subject_token(), subject_token(), prop::bool::ANY).prop_map(
        |(service, source, target, allow)| TextRule {
            service,
            source,
            target,
            action: if allow { "allow" } else { "deny" },
        },
    )
}

fn domain() -> impl Strategy<Value = Domain> {
    (
        prop::sample::select(NAMES),
        prop::option::of(prop::sample::select(LABELS)),
        prop::sample::subsequence(LABELS, 0..=LABELS.len()),
        prop::bool::ANY,
        prop::bool::ANY,
    )
        .prop_map(|(name, type_, tags, backend, toolstack)| Domain {
            name: name.to_string(),
            type_: type_.map(str::to_string),
            tags: tags.into_iter().map(str::to_string).collect(),
            backend,
            toolstack,
        })
}

fn model_subject(token: &str, d: &Domain) -> bool {
    match token {
        "*" => true,
        "@anyvm" => !d.backend && !d.toolstack,
        "@backend" => d.backend,
        "@toolstack" => d.toolstack,
        _ => {
            if let Some(tag) = token.strip_prefix("@tag:") {
                d.tags.iter().any(|t| t == tag)
            } else if let Some(type_) = token.strip_prefix("@type:") {
                d.type_.as_deref() == Some(type_)
            } else {
                d.name == token
            }
        }
    }
}

fn model_service(token: &str, port: u32, name: Option<&str>) -> bool {
    token == "*" || token == port.to_string() || Some(token) == name
}

/// The model's decision: the index of the first matching rule, and whether it allows.
fn model_decide(
    rules: &[TextRule],
    port: u32,
    name: Option<&str>,
    source: &Domain,
    target: &Domain,
) -> Option<(usize, bool)> {
    rules
        .iter()
        .position(|r| {
            model_service(&r.service, port, name)
                && model_subject(&r.source, source)
                && model_subject(&r.target, target)
        })
        .map(|i| (i, rules[i].action == "allow"))
}

fn name() -> impl Strategy<Value = Name> {
    "[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}".prop_filter_map("all digits", |s| Name::new(&s).ok())
}

fn any_subject() -> impl Strategy<Value = Subject> {
    prop_oneof![
        Just(Subject::Any),
        Just(Subject::AnyVm),
        Just(Subject::Backend),
        Just(Subject::Toolstack),
        name().prop_map(Subject::Tag),
        name().prop_map(Subject::Type),
        name().prop_map(Subject::Name),
    ]
}

fn any_rule() -> impl Strategy<Value = Rule> {
    (
        prop_oneof![Just(Service::Any), any::<u32>().prop_map(Service::Port), name().prop_map(Service::Name)],
        any_subject(),
        any_subject(),
        prop_oneof![Just(Action::Allow), Just(Action::Deny)],
        1u32..1000,
    )
        .prop_map(|(service, source, target, action, line)| Rule {
            service,
            source,
            target,
            action,
            origin: Origin { file: "10-any.policy".to_string(), line },
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decide_agrees_with_the_model(
        rules in prop::collection::vec(text_rule(), 0..24),
        connections in prop::collection::vec(
            (1u32..5, prop::option::of(prop::sample::select(SERVICE_NAMES)), domain(), domain()),
            1..16,
        ),
    ) {
        // One rule a line, behind a comment line and a blank line, so that line = 2 * index + 3.
        let mut text = String::from("# generated\n\n");
        for r in &rules {
            text.push_str(&format!("{} {} {} {}\n# between\n", r.service, r.source, r.target, r.action));
        }
        let parsed = Policy::parse_file("p.policy", &text).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        prop_assert_eq!(parsed.len(), rules.len());
        let policy = Policy::from_rules(parsed);
        for (port, service_name, source, target) in &connections {
            let service = ServiceRef { port: *port, name: service_name.as_deref() };
            let decision = policy.decide(service, &source.view(), &target.view());
            let expected = model_decide(&rules, *port, service_name.as_deref(), source, target);
            match expected {
                None => {
                    prop_assert_eq!(decision.action, Action::Deny);
                    prop_assert!(decision.rule.is_none());
                }
                Some((index, allow)) => {
                    let rule = decision.rule.ok_or_else(|| TestCaseError::fail("no rule where the model matched"))?;
                    prop_assert_eq!(rule.origin.line as usize, 2 * index + 3);
                    prop_assert_eq!(decision.action, if allow { Action::Allow } else { Action::Deny });
                }
            }
        }
    }

    #[test]
    fn a_rule_parses_back_from_its_text(rule in any_rule()) {
        let text = rule.to_string();
        let parsed = Rule::from_text(&text, rule.origin.clone())
            .map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
        prop_assert_eq!(&parsed, &rule);
        // In a file, at its line.
        let file = format!("{}{text}\n", "\n".repeat(rule.origin.line as usize - 1));
        let rules = Policy::parse_file(&rule.origin.file, &file)
            .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        prop_assert_eq!(rules, vec![rule]);
    }
}

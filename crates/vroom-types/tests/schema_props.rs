//! Property tests for config schema validation, the gate every config value
//! passes before it reaches a guest: it never panics on any string, integer
//! ranges are exact, and list fields check each item. Longer run:
//! `PROPTEST_CASES=100000 cargo test -p vroom-types --test schema_props`.

use proptest::prelude::*;
use vroom_types::{check_config, ConfigField, ConfigSchema, ConfigValues, FieldType};

fn field(kind: FieldType) -> ConfigField {
    ConfigField {
        kind,
        ..ConfigField::default()
    }
}

fn kinds() -> impl Strategy<Value = FieldType> {
    prop_oneof![
        Just(FieldType::String),
        Just(FieldType::Int),
        Just(FieldType::Bool),
        Just(FieldType::Port),
        Just(FieldType::Ipv4),
        Just(FieldType::Cidr),
        Just(FieldType::Forward),
        Just(FieldType::Host),
        Just(FieldType::Endpoint),
    ]
}

proptest! {
    #[test]
    fn any_value_of_any_type_is_judged_without_panicking(
        kind in kinds(),
        list in any::<bool>(),
        value in "\\PC{0,64}",
    ) {
        let mut f = field(kind);
        f.list = list;
        let _ = f.check(&value);
        let _ = f.template_value(&value);
        let schema: ConfigSchema = [("k".to_string(), f)].into();
        let values: ConfigValues = [("k".to_string(), value)].into();
        let _ = check_config(&schema, &values);
    }

    #[test]
    fn integer_ranges_are_exact(min in -1000i64..1000, span in 0i64..1000, v in -3000i64..3000) {
        let mut f = field(FieldType::Int);
        f.min = Some(min);
        f.max = Some(min + span);
        let inside = (min..=min + span).contains(&v);
        prop_assert_eq!(f.check(&v.to_string()).is_ok(), inside);
    }

    #[test]
    fn ports_are_1_to_65535(v in -10i64..70000) {
        let ok = field(FieldType::Port).check(&v.to_string()).is_ok();
        prop_assert_eq!(ok, (1..=65535).contains(&v));
    }

    #[test]
    fn a_list_is_valid_exactly_when_every_item_is(items in proptest::collection::vec(0u32..400, 1..6)) {
        let mut f = field(FieldType::Ipv4);
        f.list = true;
        let text: Vec<String> = items.iter().map(|n| format!("10.0.0.{n}")).collect();
        let all_valid = items.iter().all(|n| *n <= 255);
        prop_assert_eq!(f.check(&text.join(",")).is_ok(), all_valid);
    }
}

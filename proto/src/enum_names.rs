//! Enum values by the short names people read (`"succeeded"` for
//! `RUN_STATE_SUCCEEDED`, `"nt-iterative"` for `FUSION_METHOD_NT_ITERATIVE`:
//! the value's name without the enum's prefix, lowercase, with hyphens), as
//! ntctl's text output and messages show them and run specs spell them.
//! Only for text: JSON uses the full names ([`crate::json`]). Derived from
//! prost's `as_str_name`, so there is no table to keep.

fn short(full: &str, prefix: &str) -> String {
    full.trim_start_matches(prefix)
        .to_lowercase()
        .replace('_', "-")
}

macro_rules! enum_names {
    ($($module:ident: $ty:ident = $prefix:literal),* $(,)?) => {$(
        /// Short names of one enum.
        pub mod $module {
            use crate::v1::$ty;

            /// The short name of `v`, if it is a known value.
            pub fn name(v: i32) -> Option<String> {
                $ty::try_from(v).ok().map(|e| super::short(e.as_str_name(), $prefix))
            }
        }
    )*};
}

enum_names!(
    run_state: RunState = "RUN_STATE_",
    task_kind: TaskKind = "TASK_KIND_",
    task_state: TaskState = "TASK_STATE_",
    fusion_method: FusionMethod = "FUSION_METHOD_",
    device_requirement: DeviceRequirement = "DEVICE_REQUIREMENT_",
    task_directive: TaskDirective = "TASK_DIRECTIVE_",
);

#[cfg(test)]
mod tests {
    use crate::v1 as pb;

    #[test]
    fn short_names_drop_the_prefix() {
        assert_eq!(
            super::run_state::name(pb::RunState::FineTuning as i32).as_deref(),
            Some("fine-tuning")
        );
        assert_eq!(
            super::fusion_method::name(pb::FusionMethod::NtIterative as i32).as_deref(),
            Some("nt-iterative")
        );
        assert_eq!(super::task_state::name(99), None);
    }
}

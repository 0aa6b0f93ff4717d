# Sourced by the scripts: `in_ci` is true under CI (`CI=true` in any case, or `CI=1`), as the
# Rust tests' `support::in_ci` reads it: a missing input fails there instead of skipping.
in_ci() {
    local ci="${CI:-}"
    [ "${ci,,}" = true ] || [ "$ci" = 1 ]
}

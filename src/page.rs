//! The page a gateway serves at `GET /`: the seed's browser test, without the console.

/// Plain HTML and JavaScript, no build step.
pub const INDEX: &str = include_str!("page.html");

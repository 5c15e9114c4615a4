//! Routing: what a request asks for, from its method and path alone. A pure
//! function, so that the 404/405 rules and the order of the checks (which
//! come before the transfer is looked up, which after) are one table, tested
//! as such; `handlers::dispatch` only carries the decision out.

use actix_web::http::Method;

/// The one four-segment route: imageio's list of checksum algorithms.
const CHECKSUM_ALGORITHMS: &str = "checksum/algorithms";

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// `GET /info[/]`: server information.
    Info,
    /// `GET /images/{any}/checksum/algorithms`.
    ChecksumAlgorithms,
    /// `OPTIONS /images/*`: what the server can do for any image.
    OptionsAll,
    /// 404 `not found`, without a lookup.
    NotFound,
    /// 405 `method not allowed`.
    MethodNotAllowed,
    /// An operation on the transfer with this id: it is looked up first (404
    /// `unknown image_id` when there is none).
    Transfer(String, Op),
}

/// What a request does with its transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// `OPTIONS /images/{id}`.
    Options,
    /// `GET /images/{id}`.
    Read,
    /// `HEAD /images/{id}`.
    Head,
    /// `GET /images/{id}/extents`.
    Extents,
    /// `GET /images/{id}/checksum`.
    Checksum,
    /// `PUT /images/{id}`.
    Write,
    /// `PATCH /images/{id}`.
    Patch,
    /// `POST /images/{id}/flush`.
    Flush,
    /// A GET or POST with a tail that method does not serve: 404 `not
    /// found`, but only once the id is known (an unknown id is
    /// `unknown image_id`), as `image_server.py` answered.
    UnknownTail,
}

/// Decides what `method` on `path` asks for (see [`Route`]).
pub(crate) fn route(method: &Method, path: &str) -> Route {
    if is_info(path) {
        return if *method == Method::GET {
            Route::Info
        } else {
            Route::MethodNotAllowed
        };
    }
    let Some((id, tail)) = split_path(path) else {
        return Route::NotFound;
    };
    let op = match (method.as_str(), tail) {
        ("GET", Some(CHECKSUM_ALGORITHMS)) => return Route::ChecksumAlgorithms,
        ("OPTIONS", None) if id == "*" => return Route::OptionsAll,
        ("OPTIONS", None) => Op::Options,
        ("GET", None) => Op::Read,
        ("GET", Some("extents")) => Op::Extents,
        ("GET", Some("checksum")) => Op::Checksum,
        ("GET", Some(_)) => Op::UnknownTail,
        ("HEAD", None) => Op::Head,
        ("PUT", None) => Op::Write,
        ("PATCH", None) => Op::Patch,
        ("POST", Some("flush")) => Op::Flush,
        ("POST", _) => Op::UnknownTail,
        ("OPTIONS" | "HEAD" | "PUT" | "PATCH", Some(_)) => return Route::NotFound,
        _ => return Route::MethodNotAllowed,
    };
    Route::Transfer(id, op)
}

/// `/info` (or `/info/`): imageio's server information endpoint.
fn is_info(path: &str) -> bool {
    let mut parts = path.split('/').filter(|p| !p.is_empty());
    parts.next() == Some("info") && parts.next().is_none()
}

/// Splits `/images/{id}[/{tail}]` like `image_server.py`: empty segments are
/// ignored, more than three segments is no route (but for
/// `/images/{id}/checksum/algorithms`, whose tail is
/// [`CHECKSUM_ALGORITHMS`]). The id is percent-decoded (a `%` not followed
/// by two hex digits stays as it is); an id that does not decode to UTF-8 is
/// kept as an impossible id (empty: unknown).
fn split_path(path: &str) -> Option<(String, Option<&str>)> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.len() < 2 || parts[0] != "images" {
        return None;
    }
    let tail = match parts.len() {
        2 => None,
        3 => Some(parts[2]),
        4 if parts[2] == "checksum" && parts[3] == "algorithms" => Some(CHECKSUM_ALGORITHMS),
        _ => return None,
    };
    let id = percent_encoding::percent_decode_str(parts[1])
        .decode_utf8()
        .map(String::from)
        .unwrap_or_default();
    Some((id, tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_like_image_server_py() {
        assert_eq!(split_path("/images/demo"), Some(("demo".to_string(), None)));
        assert_eq!(
            split_path("/images/demo/"),
            Some(("demo".to_string(), None))
        );
        assert_eq!(
            split_path("//images//demo/extents"),
            Some(("demo".to_string(), Some("extents")))
        );
        assert_eq!(split_path("/images/%2e%2e"), Some(("..".to_string(), None)));
        assert_eq!(
            split_path("/images/a%00b"),
            Some(("a\0b".to_string(), None))
        );
        // A `%` without two hex digits is itself (as in the WHATWG URL
        // standard's percent-decode); bytes that are not UTF-8 are no id.
        assert_eq!(split_path("/images/%zz"), Some(("%zz".to_string(), None)));
        assert_eq!(split_path("/images/%4"), Some(("%4".to_string(), None)));
        assert_eq!(split_path("/images/%"), Some(("%".to_string(), None)));
        assert_eq!(split_path("/images/%ff"), Some((String::new(), None)));
        assert_eq!(
            split_path("/images/a%C3%A9"),
            Some(("a\u{e9}".to_string(), None))
        );
        assert_eq!(split_path("/images"), None);
        assert_eq!(split_path("/other/x"), None);
        assert_eq!(split_path("/images/a/b/c"), None);
        assert_eq!(
            split_path("/images/x/checksum/algorithms/"),
            Some(("x".to_string(), Some(CHECKSUM_ALGORITHMS)))
        );
        assert_eq!(split_path("/images/x/checksum/other"), None);
        assert_eq!(split_path("/images/x/checksum/algorithms/y"), None);
    }

    /// Every rule of [`route`], as a table: the method, the path, and what
    /// it asks for.
    #[test]
    fn route_table() {
        use Route::*;
        let t = |op| Transfer("d".to_string(), op);
        let cases: &[(&str, &str, Route)] = &[
            ("GET", "/info", Info),
            ("GET", "/info/", Info),
            ("PUT", "/info", MethodNotAllowed),
            ("GET", "/info/x", NotFound),
            ("GET", "/", NotFound),
            ("GET", "/images", NotFound),
            ("DELETE", "/images", NotFound),
            ("GET", "/images/d/a/b", NotFound),
            ("GET", "/images/d/checksum/algorithms", ChecksumAlgorithms),
            ("GET", "/images/*/checksum/algorithms", ChecksumAlgorithms),
            ("POST", "/images/d/checksum/algorithms", t(Op::UnknownTail)),
            ("OPTIONS", "/images/*", OptionsAll),
            ("OPTIONS", "/images/d", t(Op::Options)),
            ("OPTIONS", "/images/d/extents", NotFound),
            ("GET", "/images/d", t(Op::Read)),
            ("GET", "/images/d/extents", t(Op::Extents)),
            ("GET", "/images/d/checksum", t(Op::Checksum)),
            ("GET", "/images/d/flush", t(Op::UnknownTail)),
            ("GET", "/images/d/other", t(Op::UnknownTail)),
            ("HEAD", "/images/d", t(Op::Head)),
            ("HEAD", "/images/d/extents", NotFound),
            ("PUT", "/images/d", t(Op::Write)),
            ("PUT", "/images/d/extents", NotFound),
            ("PATCH", "/images/d", t(Op::Patch)),
            ("PATCH", "/images/d/flush", NotFound),
            ("POST", "/images/d/flush", t(Op::Flush)),
            ("POST", "/images/d", t(Op::UnknownTail)),
            ("POST", "/images/d/extents", t(Op::UnknownTail)),
            ("DELETE", "/images/d", MethodNotAllowed),
            ("DELETE", "/images/d/extents", MethodNotAllowed),
            ("TRACE", "/images/d", MethodNotAllowed),
        ];
        for (method, path, want) in cases {
            let m = Method::from_bytes(method.as_bytes()).unwrap();
            assert_eq!(&route(&m, path), want, "{method} {path}");
        }
    }
}

//! Property tests of the parsers and the extents merge (the same checks the
//! fuzz targets run, with modest case counts so `make test` stays fast).

mod props;

use proptest::prelude::*;

use cloudstack_image_server::http::patch_op::PatchOp;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn range_parsers_on_any_text(s in "(bytes)?[ =\\-0-9,/*a-z\t]{0,40}") {
        props::check_range(s.as_bytes());
    }

    #[test]
    fn range_parsers_on_any_bytes(b in proptest::collection::vec(any::<u8>(), 0..64)) {
        props::check_range(&b);
    }

    #[test]
    fn ranges_round_trip(a in any::<u64>(), b in any::<u64>()) {
        props::check_range_roundtrip(a, b);
    }

    #[test]
    fn patch_json_on_any_bytes(b in proptest::collection::vec(any::<u8>(), 0..128)) {
        props::check_patch_json(&b);
    }

    #[test]
    fn patch_json_on_json_like_text(
        s in "\\{(\"(op|size|offset|flush)\":(\"(zero|flush)\"|-?[0-9]{1,21}|true|false|null|1e3|\\[\\]),?){0,5}\\}"
    ) {
        props::check_patch_json(s.as_bytes());
    }

    #[test]
    fn patch_ops_round_trip(offset in any::<u64>(), size in 1..=u64::MAX, flush in any::<bool>()) {
        let op = PatchOp::Zero { offset, size, flush };
        props::check_patch_json(props::patch_json(op).as_bytes());
    }

    #[test]
    fn config_on_json_like_text(
        s in "\\{(\"(backend|socket|file|export|export_bitmap|idle_timeout_seconds)\":(\"(nbd|file|NBD|/[a-z./]{0,12}|[a-z]{0,4})\"|-?[0-9.]{1,6}|null|true),?){0,5}\\}"
    ) {
        props::check_config(s.as_bytes());
    }

    #[test]
    fn config_on_any_bytes(b in proptest::collection::vec(any::<u8>(), 0..96)) {
        props::check_config(&b);
    }

    #[test]
    fn merge_dirty_properties(b in proptest::collection::vec(any::<u8>(), 0..96)) {
        props::check_merge_bytes(&b);
    }
}

#[test]
fn merge_dirty_edge_cases() {
    for data in [
        &[][..],
        &[0, 0][..],
        &[10, 0, 0xFF][..],
        &[10, 0, 0x81, 0xFF, 0x81][..],
        &[200, 0, 5, 0x85, 0, 3, 0xFF, 0x82, 0, 0x7F, 0x01][..],
        &[1, 1, 0x7F, 0x7F, 0xFF, 0x7F, 0x80][..],
    ] {
        props::check_merge_bytes(data);
    }
}

//! Reading preference data: every source format, column mapping, the HH-RLHF converter on the real file, and
//! bad input that names the file, line, column and row (or is skipped and counted).

use crate::common::{error_text, fixture};
use prefalign::data::prepare::{prepare, to_pairs, PrepareOptions, RowFormat, Rules};
use prefalign::data::source::{read_rows, RawRow, ReadRows};
use prefalign::data::tokenize::PairTokenizer;
use prefalign::model::tokenizer::TextTokenizer;
use std::path::Path;

fn fields(rows: &[RawRow]) -> Vec<serde_json::Value> {
    rows.iter().map(|r| serde_json::Value::Object(r.fields.clone())).collect()
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Prepares `path` for DPO with `edit` applied to the default options.
fn prepare_file(
    path: &Path,
    edit: impl FnOnce(&mut PrepareOptions),
) -> anyhow::Result<prefalign::data::prepare::Prepared> {
    prepare_rows(read_rows(path)?, edit)
}

/// Prepares `read` for DPO with `edit` applied to the default options.
fn prepare_rows(
    read: ReadRows,
    edit: impl FnOnce(&mut PrepareOptions),
) -> anyhow::Result<prefalign::data::prepare::Prepared> {
    let tokenizer = tokenizer();
    let tok = PairTokenizer::new(&tokenizer)?;
    let mut options = PrepareOptions::new(Rules::Dpo);
    edit(&mut options);
    prepare(read, &tok, &options)
}

/// The real HH-RLHF harmless test split (data/hh-rlhf: Anthropic, MIT).
fn hh_rlhf_file() -> std::path::PathBuf {
    crate::common::repo_path("data/hh-rlhf/harmless-base-test.jsonl.gz")
}

/// Runs `prefalign data export` on the first 120 rows of the HH-RLHF file with `extra` flags: the written file and
/// the process output.
fn export_hh_rows(dir: &Path, extra: &[&str]) -> (std::path::PathBuf, std::process::Output) {
    let source = hh_rlhf_file();
    let exported = dir.join("rows.jsonl");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_prefalign"))
        .args(["data", "export", "--dataset", source.to_str().unwrap(), "--dataset-format", "hh-rlhf"])
        .args(["--dataset-split", "train[:120]", "--skip-invalid-rows", "--output", exported.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    (exported, output)
}

#[test]
fn parquet_file_and_folder_of_shards_read_like_jsonl() {
    let jsonl = read_rows(&fixture("trl_data/standard.jsonl")).unwrap();
    let parquet = read_rows(&fixture("parquet/standard.parquet")).unwrap();
    assert_eq!(fields(&parquet.rows), fields(&jsonl.rows));
    assert!(parquet.rows[0].location.ends_with("standard.parquet row 0"));
    let jsonl = read_rows(&fixture("trl_data/conversational.jsonl")).unwrap();
    let shards = read_rows(&fixture("parquet/conversational")).unwrap();
    assert_eq!(fields(&shards.rows), fields(&jsonl.rows));
}

/// `name`.parquet reads as the rows of `name`.expected.json (both written by tools/fixtures/make_parquet_fixtures.py).
fn assert_parquet_reads_as_expected(name: &str) {
    let rows = read_rows(&fixture(&format!("parquet/{name}.parquet"))).unwrap();
    let expected: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("parquet/{name}.expected.json"))).unwrap())
            .unwrap();
    assert_eq!(fields(&rows.rows), expected);
}

/// Nulls at every depth, a float32 and a map column: null object fields are left out as in a JSON Lines row, null
/// list items stay, a map is an object.
#[test]
fn parquet_nulls_floats_and_maps_read_as_json_rows() {
    assert_parquet_reads_as_expected("nulls");
}

/// Booleans (in lists too), zstd, version 2 data pages of a few values, a page index, page checksums and a bloom
/// filter pass the checks of a file's structure (`data::parquet_check`) and read as written.
#[test]
fn parquet_writer_options_pass_the_structure_checks() {
    assert_parquet_reads_as_expected("writer-options");
}

#[test]
fn json_array_and_gzip() {
    let rows = read_rows(&fixture("trl_data/standard.jsonl")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let array = serde_json::to_vec(&fields(&rows.rows)).unwrap();
    let json = write(dir.path(), "data.json", &array);
    assert_eq!(fields(&read_rows(&json).unwrap().rows), fields(&rows.rows));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &std::fs::read(fixture("trl_data/standard.jsonl")).unwrap()).unwrap();
    let gzipped = write(dir.path(), "data.jsonl.gz", &gz.finish().unwrap());
    assert_eq!(fields(&read_rows(&gzipped).unwrap().rows), fields(&rows.rows));
    let err = error_text(read_rows(&write(dir.path(), "data.tsv", b"a\tb")));
    assert!(err.contains("unknown dataset format"), "{err}");
}

const GOOD: &str = r#"{"prompt": "Hi", "chosen": " Hello!", "rejected": " Go away."}"#;

#[test]
fn malformed_json_line_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.jsonl",
        format!("{GOOD}\n{GOOD}\n{{\"prompt\": \"Hi\", \"chosen\": \n{GOOD}\n").as_bytes(),
    );
    let err = error_text(prepare_file(&path, |_| {}));
    assert!(err.contains("bad.jsonl:3: invalid JSON") && err.contains("--skip-invalid-rows"), "{err}");
    let prepared = prepare_file(&path, |o| o.skip_invalid_rows = true).unwrap();
    assert_eq!((prepared.report.rows_read, prepared.report.invalid.len(), prepared.pairs.len()), (4, 1, 3));
}

#[test]
fn invalid_utf8_names_the_line_and_byte() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = format!("{GOOD}\n").into_bytes();
    bytes.extend(b"{\"prompt\": \"caf\xe9\", \"chosen\": \"a\", \"rejected\": \"b\"}\n");
    let path = write(dir.path(), "latin1.jsonl", &bytes);
    let err = error_text(prepare_file(&path, |_| {}));
    assert!(err.contains("latin1.jsonl:2: invalid UTF-8 at byte 15"), "{err}");
}

#[test]
fn missing_and_mistyped_columns_name_column_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let path =
        write(dir.path(), "cols.jsonl", format!("{GOOD}\n{{\"prompt\": \"Hi\", \"chosen\": \"a\"}}\n").as_bytes());
    let err = error_text(prepare_file(&path, |_| {}));
    assert!(err.contains("cols.jsonl:2: missing column \"rejected\" (the row has: chosen, prompt)"), "{err}");
    let path = write(
        dir.path(),
        "types.jsonl",
        format!("{GOOD}\n{{\"prompt\": \"Hi\", \"chosen\": 5, \"rejected\": \"b\"}}\n").as_bytes(),
    );
    let err = error_text(prepare_file(&path, |_| {}));
    assert!(
        err.contains("types.jsonl:2: column \"chosen\": expected a string like the first row, found a number"),
        "{err}"
    );
}

#[test]
fn column_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "mapped.jsonl", br#"{"question": "Hi", "good": " Hello!", "bad": " Go away."}"#);
    let err = error_text(prepare_file(&path, |_| {}));
    assert!(err.contains("missing column \"chosen\""), "{err}");
    let prepared = prepare_file(&path, |o| {
        o.columns.prompt = "question".into();
        o.columns.chosen = "good".into();
        o.columns.rejected = "bad".into();
    })
    .unwrap();
    assert_eq!(prepared.pairs.len(), 1);
}

#[test]
fn empty_completions_and_broken_roles() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "empty.jsonl", br#"{"prompt": "Hi", "chosen": "", "rejected": "b"}"#);
    let err = error_text(prepare_file(&path, |_| {}));
    assert!(err.contains("empty.jsonl:1: column \"chosen\" is empty"), "{err}");
    assert_eq!(prepare_file(&path, |o| o.validation.allow_empty_completions = true).unwrap().pairs.len(), 1);

    let user = r#"{"role": "user", "content": "Hi"}"#;
    let assistant = r#"{"role": "assistant", "content": "Hello"}"#;
    let system = r#"{"role": "system", "content": "Be brief."}"#;
    let lines = [
        format!(r#"{{"prompt": [{user}], "chosen": [{assistant}], "rejected": [{assistant}]}}"#),
        format!(r#"{{"prompt": [{user}], "chosen": [{user}], "rejected": [{assistant}]}}"#),
        format!(r#"{{"prompt": [{user}, {system}], "chosen": [{assistant}], "rejected": [{assistant}]}}"#),
        format!(
            r#"{{"prompt": [{{"role": "narrator", "content": "x"}}], "chosen": [{assistant}], "rejected": [{assistant}]}}"#
        ),
    ];
    let path = write(dir.path(), "roles.jsonl", lines.join("\n").as_bytes());
    let err = error_text(prepare_file(&path, |_| {}));
    assert!(err.contains("roles.jsonl:2: column \"chosen\": the completion starts with a \"user\" message"), "{err}");
    assert!(err.contains("and 2 more invalid rows"), "{err}");
    let prepared = prepare_file(&path, |o| o.skip_invalid_rows = true).unwrap();
    let reasons: Vec<String> = prepared.report.invalid.iter().map(|i| i.reason.to_string()).collect();
    assert_eq!(prepared.pairs.len(), 1);
    assert!(reasons[1].contains("message 1 is a system message"), "{reasons:?}");
    assert!(reasons[2].contains("unknown role \"narrator\""), "{reasons:?}");
}

/// The real Anthropic HH-RLHF harmless test split through the converter: every row is accounted for.
#[test]
fn hh_rlhf_harmless_pairs() {
    let path = hh_rlhf_file();
    let mut options = PrepareOptions::new(Rules::Dpo);
    options.row_format = RowFormat::HhRlhf;
    let (pairs, report) = to_pairs(read_rows(&path).unwrap(), &options);
    assert_eq!(report.rows_read, 2312);
    assert_eq!(pairs.len() + report.invalid.len(), 2312);
    assert!(report.invalid.len() < 20, "{} invalid", report.invalid.len());
    let prepared = prepare_file(&path, |o| {
        o.row_format = RowFormat::HhRlhf;
        o.skip_invalid_rows = true;
        o.max_length = Some(512);
    })
    .unwrap();
    assert_eq!(prepared.pairs.len() + prepared.report.dropped.len() + prepared.report.invalid.len(), 2312);
    // Whole answers: every completion ends with the template's end of turn.
    assert!(prepared.pairs.iter().all(|p| p.chosen.completion().ends_with(&[2, 198])));
}

/// `prefalign data export` writes the HH pairs as conversational rows that tokenize to exactly the ids of the
/// transcripts themselves: what tools/results/trl_recipe.py hands to TRL.
#[test]
fn exported_hh_rows_tokenize_like_the_transcripts() {
    let source = hh_rlhf_file();
    let dir = tempfile::tempdir().unwrap();
    let (exported, output) = export_hh_rows(dir.path(), &[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let direct = prepare_file(&source, |o| {
        o.row_format = RowFormat::HhRlhf;
        o.skip_invalid_rows = true;
    })
    .unwrap();
    let from_export = prepare_file(&exported, |_| {}).unwrap();
    assert!(from_export.report.invalid.is_empty());
    let direct_ids = pair_ids(&direct);
    let exported_ids = pair_ids(&from_export);
    assert!(exported_ids.len() > 100);
    assert_eq!(exported_ids, direct_ids[..exported_ids.len()]);
}

/// With --model and --trainer orpo, the export leaves out the pairs whose completion truncation empties (TRL would
/// keep them and train on a NaN loss): the file holds exactly the pairs an ORPO run trains on.
#[test]
fn export_with_a_model_leaves_out_what_the_rules_drop() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer_dir = fixture("trl_data/tokenizer");
    let (exported, output) = export_hh_rows(
        dir.path(),
        &["--model", tokenizer_dir.to_str().unwrap(), "--trainer", "orpo", "--max-length", "128"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let orpo = |o: &mut PrepareOptions| {
        o.rules = Rules::Orpo;
        o.max_length = Some(128);
    };
    let mut first_rows = read_rows(&hh_rlhf_file()).unwrap();
    first_rows.rows.truncate(120);
    let direct = prepare_rows(first_rows, |o| {
        o.row_format = RowFormat::HhRlhf;
        o.skip_invalid_rows = true;
        orpo(o);
    })
    .unwrap();
    assert!(!direct.report.dropped.is_empty(), "max_length 128 empties some completions of these rows");
    let counts = format!("wrote {} pairs to", direct.pairs.len());
    let dropped = format!("{} dropped by the ORPO rules at max_length 128", direct.report.dropped.len());
    assert!(stderr.contains(&counts) && stderr.contains(&dropped), "{stderr}");
    let from_export = prepare_file(&exported, orpo).unwrap();
    assert!(from_export.report.dropped.is_empty() && from_export.report.invalid.is_empty());
    assert_eq!(pair_ids(&from_export), pair_ids(&direct));
}

fn pair_ids(prepared: &prefalign::data::prepare::Prepared) -> Vec<(Vec<i64>, Vec<i64>)> {
    prepared.pairs.iter().map(|pair| (pair.chosen.ids.clone(), pair.rejected.ids.clone())).collect()
}

/// `datasets`' `to_json` writes JSON Lines into a `.json` file; a `.json` array reads as before.
#[test]
fn a_json_file_holds_json_lines_or_an_array() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = read_rows(&fixture("trl_data/standard.jsonl")).unwrap();
    let lines = write(dir.path(), "to_json.json", &std::fs::read(fixture("trl_data/standard.jsonl")).unwrap());
    let read = read_rows(&lines).unwrap();
    assert_eq!(fields(&read.rows), fields(&jsonl.rows));
    assert!(read.rows[1].location.ends_with("to_json.json:2"), "{}", read.rows[1].location);
    let array = format!(
        "\n  [{}]",
        jsonl
            .rows
            .iter()
            .map(|r| serde_json::Value::Object(r.fields.clone()).to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let read = read_rows(&write(dir.path(), "array.json", array.as_bytes())).unwrap();
    assert_eq!(fields(&read.rows), fields(&jsonl.rows));
}

/// CSV as `datasets`' csv loader reads preference data: a header, quoted cells with commas, quotes and line
/// breaks, empty cells as null; a record with the wrong number of fields is an invalid row named by its line.
#[test]
fn csv_files_are_read_with_quoted_cells_and_bad_records_named() {
    let dir = tempfile::tempdir().unwrap();
    let text = "prompt,chosen,rejected\n\
                \"Say \"\"hi\"\", please\",\"Hi,\nthere\",Go away\n\
                What is 2+2?,4,\n\
                only,two\n\
                Last?,Yes,No\n";
    let path = write(dir.path(), "prefs.csv", text.as_bytes());
    let read = read_rows(&path).unwrap();
    assert_eq!(
        fields(&read.rows),
        [
            serde_json::json!({"prompt": "Say \"hi\", please", "chosen": "Hi,\nthere", "rejected": "Go away"}),
            serde_json::json!({"prompt": "What is 2+2?", "chosen": "4", "rejected": null}),
            serde_json::json!({"prompt": "Last?", "chosen": "Yes", "rejected": "No"}),
        ]
    );
    assert_eq!(read.rows[1].location, format!("{}:4", path.display()), "the record's line (after a two-line cell)");
    assert_eq!(read.invalid.len(), 1);
    let invalid = read.invalid[0].to_string();
    assert!(invalid.contains("prefs.csv:5") && invalid.contains("2 fields where the header has 3"), "{invalid}");
    // gzipped, and in a folder with other formats
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, text.as_bytes()).unwrap();
    let gz_path = write(dir.path(), "more.csv.gz", &gz.finish().unwrap());
    assert_eq!(read_rows(&gz_path).unwrap().rows.len(), 3);
    assert_eq!(read_rows(dir.path()).unwrap().rows.len(), 6);
}

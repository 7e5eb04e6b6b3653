//! An MCP tool whose `call` returns 4 MiB of content (a JSON string), to test the host's
//! output size limit. `describe` is well-behaved.
wit_bindgen::generate!({ world: "mcp-tool", path: "../../../wit" });

use exports::nops::plugin::tool::{Description, Guest};

/// Size of the returned content, in bytes, quotes included.
const OUTPUT_BYTES: usize = 4 << 20;

struct Oversized;

impl Guest for Oversized {
    fn describe() -> Description {
        Description {
            name: "oversized".into(),
            description: "Returns 4 MiB of content.".into(),
            input_schema: r#"{"type":"object","additionalProperties":false}"#.into(),
        }
    }

    fn call(_arguments: String) -> Result<String, String> {
        let mut content = String::with_capacity(OUTPUT_BYTES);
        content.push('"');
        content.extend(std::iter::repeat_n('x', OUTPUT_BYTES - 2));
        content.push('"');
        Ok(content)
    }
}

export!(Oversized);

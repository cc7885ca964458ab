import Foundation
import StarFlow

/// `starflow-swift tokenize "text" --tokenizer tokenizer.json --length N`: the ids and mask the
/// text encoder would get, as one line of JSON.
enum TokenizeCommand {
    static let usage = "starflow-swift tokenize \"text\" --tokenizer tokenizer.json [--length 128]"

    static func run(_ arguments: [String], output: (String) -> Void) throws {
        let parsed = try ParsedArguments(arguments, options: ["tokenizer", "length"], flags: [])
        let text = try parsed.single("text to tokenize")
        guard let path = parsed.string("tokenizer") else { throw UsageError("--tokenizer is required") }
        let length = try parsed.int("length") ?? 128
        let tokenizer = try T5Tokenizer(contentsOf: URL(fileURLWithPath: path))
        let encoded = try tokenizer.encode(text, length: length)
        let ids = encoded.inputIds.map(String.init).joined(separator: ", ")
        let mask = encoded.attentionMask.map(String.init).joined(separator: ", ")
        output("{\"input_ids\": [\(ids)], \"attention_mask\": [\(mask)]}")
    }
}

import Foundation
import Testing
@testable import StarFlow

/// The contract against real files: the manifest an actual export writes loads and validates,
/// and every function the Core ML backends call declares exactly the inputs and outputs (names
/// and shapes) that the manifest implies — as read from the saved packages by coremltools.
struct ExportContractTests {
    @Test(arguments: ["text", "label"])
    func everyFunctionDeclaresWhatTheManifestImplies(name: String) throws {
        let (folder, declared) = try Fixtures.export(name)
        let manifest = try ExportManifest.load(from: folder)
        var checked: Set<String> = []
        func check(_ package: String, _ function: String, _ expected: ModelInterface?) throws {
            let key = "\(package):\(function)"
            let actual = try #require(declared[key], "the export has no function \(key)")
            try actual.check(against: try #require(expected, "no expectation for \(key)"), path: package, function: function)
            checked.insert(key)
        }
        for block in manifest.flow.blocks {
            for (part, package) in block.packageChain.enumerated() {
                for (size, function) in block.stepFunctions {
                    try check(package, function, manifest.stepInterface(of: block, chunk: size, part: part))
                }
                if let prefill = block.functions.prefill {
                    try check(package, prefill, manifest.prefillInterface(of: block, part: part))
                }
                if let forward = block.functions.forward, let vjp = block.functions.vjp {
                    try check(package, forward, manifest.forwardInterface(of: block, part: part))
                    try check(package, vjp, manifest.vjpInterface(of: block, part: part))
                }
            }
        }
        if let encoder = manifest.textEncoder {
            for (part, package) in encoder.packageChain.enumerated() {
                try check(package, "main", manifest.textEncoderInterface(part: part))
            }
        }
        if let vae = manifest.vae {
            try check(vae.package, "main", manifest.decoderInterface(input: try #require(vae.input), output: try #require(vae.output)))
        }
        #expect(checked == Set(declared.keys), "functions the Swift side never calls: \(Set(declared.keys).subtracting(checked).sorted())")
    }

    @Test func textExportCarriesTheFixtureTokenizer() throws {
        let (folder, _) = try Fixtures.export("text")
        let manifest = try ExportManifest.load(from: folder)
        let condition = try #require(manifest.condition)
        #expect(condition.kind == "text" && condition.length == 16 && condition.dim == 32)
        let tokenizer = try T5Tokenizer(contentsOf: folder.appendingPathComponent(try #require(condition.tokenizer)))
        let expected = try Fixtures.safetensors("t5/fixtures.safetensors").integers("cfg.input_ids")
        #expect(try tokenizer.encode("red panda", length: 16).inputIds.map(Int.init) == Array(expected.values[16..<32]))
    }

    @Test func labelExportListsTheFixtureLabels() throws {
        let (folder, _) = try Fixtures.export("label")
        let manifest = try ExportManifest.load(from: folder)
        let vocabulary = try String(contentsOf: Fixtures.file("starflow/label_model/labels.vocab"), encoding: .utf8)
        let labels = vocabulary.split(separator: "\n").compactMap { $0.split(separator: "\t").first.map(String.init) }
        #expect(manifest.condition?.labels == labels)
        #expect(manifest.vae == nil && manifest.textEncoder == nil)
        #expect(manifest.flow.blocks.map(\.flipped) == [true, false, true])
    }
}

import Foundation
import Testing
@testable import StarFlow

/// Reading an export folder's manifest: the contract's example layout loads; a missing package,
/// an inconsistent shape or another format fails with the file and field named.
struct ExportManifestTests {
    /// A text model laid out as the contract's example, scaled down: 4×8×8 latent, 3 blocks.
    static func textManifest() -> [String: Any] {
        func block(_ index: Int) -> [String: Any] {
            let deep = index == 2
            return [
                "index": index, "package": "FlowBlock\(index).mlpackage", "flipped": index % 2 == 0, "has_text": deep,
                "rows": deep ? 2 : 1, "tokens": 64, "token_channels": 4, "text_length": deep ? 16 : 0,
                "cache_length": (deep ? 16 : 0) + 64 + 15, "sos": [0.1, 0.2, 0.3, 0.4],
                "functions": ["prefill": deep ? "prefill" : NSNull(), "step": ["1": "step_1", "16": "step_16"],
                              "forward": "forward", "vjp": "vjp"] as [String: Any],
                "inputs": ["tokens": "tokens", "position": "position", "text": deep ? "text" : NSNull()] as [String: Any],
                "outputs": ["scale_logit": "scale_logit", "shift": "shift"],
            ]
        }
        return [
            "format": "mlx-starflow-coreml", "format_version": 2,
            "model": ["name": "tiny", "source_sha256": "00", "license": "research"],
            "precision": "float16", "compression": NSNull(), "attention": "original", "target": "macOS15",
            "kv_cache": "state", "batch": 1,
            "image": ["height": 64, "width": 64, "channels": 3],
            "latent": ["channels": 4, "height": 8, "width": 8, "patch_size": 1],
            "condition": ["kind": "text", "length": 16, "dim": 32, "tokenizer": "tokenizer.json"],
            "vae": ["package": "VAEDecoder.mlpackage", "scaling_factor": 0.18215, "factor": 8],
            "flow": ["use_softplus": true, "noise_std": 0.3, "blocks": (0..<3).map(block)],
            "text_encoder": ["package": "TextEncoder.mlpackage",
                             "inputs": ["input_ids": "input_ids", "attention_mask": "attention_mask"], "output": "text_states"],
            "score_step": ["noise_std": 0.3,
                           "inputs": ["tokens": "tokens", "hidden": "hidden", "cotangent": "cotangent", "text": "text"],
                           "outputs": ["z": "z", "next_hidden": "next_hidden", "tokens_cotangent": "tokens_cotangent",
                                       "hidden_cotangent": "hidden_cotangent"]],
        ]
    }

    /// Writes `manifest` and an empty stand-in for every file it names into a fresh folder.
    static func exportFolder(_ manifest: [String: Any], skipping skipped: Set<String> = []) throws -> URL {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("starflow-export-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        try JSONSerialization.data(withJSONObject: manifest).write(to: folder.appendingPathComponent("manifest.json"))
        let decoded = try ExportManifest.decode(JSONSerialization.data(withJSONObject: manifest), source: "manifest.json")
        for file in decoded.requiredFiles where !skipped.contains(file) {
            try FileManager.default.createDirectory(at: folder.appendingPathComponent(file), withIntermediateDirectories: true)
        }
        return folder
    }

    static func load(_ manifest: [String: Any], skipping skipped: Set<String> = []) throws -> ExportManifest {
        let folder = try exportFolder(manifest, skipping: skipped)
        defer { try? FileManager.default.removeItem(at: folder) }
        return try ExportManifest.load(from: folder)
    }

    static func loadError(_ manifest: [String: Any], skipping skipped: Set<String> = []) -> String {
        do {
            _ = try load(manifest, skipping: skipped)
            return "loaded without error"
        } catch {
            return "\(error)"
        }
    }

    @Test func contractLayoutLoads() throws {
        let manifest = try Self.load(Self.textManifest())
        #expect(manifest.flow.blocks.count == 3)
        #expect(manifest.flow.blocks[2].stepFunctions.map(\.size) == [1, 16])
        #expect(manifest.vae?.scalingFactor == 0.18215)
        #expect(manifest.requiredFiles.contains("tokenizer.json"))
    }

    @Test func missingPackageIsNamed() {
        let message = Self.loadError(Self.textManifest(), skipping: ["FlowBlock1.mlpackage"])
        #expect(message.contains("FlowBlock1.mlpackage") && message.contains("not found"))
    }

    @Test func missingManifestSaysWhatToPointAt() {
        #expect(throws: StarFlowError.self) { try ExportManifest.load(from: URL(fileURLWithPath: "/nonexistent/export")) }
    }

    @Test func otherFormatVersionIsRefused() {
        var manifest = Self.textManifest()
        manifest["format_version"] = 1
        #expect(Self.loadError(manifest).contains("version 1"))
    }

    @Test func scoreStepNeedsForwardAndVJPInEveryBlock() {
        let manifest = Self.withBlock(Self.textManifest(), 1) { block in
            block["functions"] = ["step": ["1": "step_1", "16": "step_16"]]
        }
        #expect(Self.loadError(manifest).contains("flow.blocks[1]: the score step needs forward and vjp"))
    }

    @Test func missingKeyIsNamedWithItsPath() {
        var manifest = Self.textManifest()
        var latent = manifest["latent"] as! [String: Any]
        latent["patch_size"] = nil
        manifest["latent"] = latent
        #expect(Self.loadError(manifest).contains("latent.patch_size"))
    }

    @Test func mismatchedTokenChannelsAreCaught() {
        let manifest = Self.withBlock(Self.textManifest(), 0) { $0["token_channels"] = 12 }
        let message = Self.loadError(manifest)
        #expect(message.contains("flow.blocks[0]") && message.contains("token_channels 12"))
    }

    @Test func wrongCacheLengthIsCaught() {
        let manifest = Self.withBlock(Self.textManifest(), 2) { $0["cache_length"] = 80 }
        #expect(Self.loadError(manifest).contains("cache_length 80, expected text + tokens + largest chunk − 1 = 95"))
    }

    @Test func labelModelNeedsOneColumnPerLabelPlusEmpty() throws {
        var manifest = Self.withBlock(Self.textManifest(), 2) { block in
            block["text_length"] = 1
            block["cache_length"] = 1 + 64 + 15
        }
        manifest["condition"] = ["kind": "labels", "length": 1, "dim": 3, "labels": ["cat", "dog"]]
        manifest["text_encoder"] = NSNull()
        #expect(try Self.load(manifest).condition?.labels == ["cat", "dog"])
        manifest["condition"] = ["kind": "labels", "length": 1, "dim": 2, "labels": ["cat", "dog"]]
        #expect(Self.loadError(manifest).contains("dim 3"))
    }

    @Test func declaredInterfaceMustMatchTheManifest() throws {
        let manifest = try ExportManifest.decode(JSONSerialization.data(withJSONObject: Self.textManifest()), source: "manifest.json")
        let deep = manifest.flow.blocks[2]
        let expected = manifest.stepInterface(of: deep, chunk: 16)
        try expected.check(against: expected, path: "FlowBlock2.mlpackage", function: "step_16")

        var wrongShape = expected
        wrongShape.inputs["tokens"] = [2, 16, 12]
        let error = #expect(throws: StarFlowError.self) {
            try wrongShape.check(against: expected, path: "FlowBlock2.mlpackage", function: "step_16")
        }
        #expect(error?.description.contains("FlowBlock2.mlpackage") == true)
        #expect(error?.description.contains("[2, 16, 12]") == true)

        var renamed = expected
        renamed.inputs["pos"] = renamed.inputs.removeValue(forKey: "position")
        #expect(throws: StarFlowError.self) { try renamed.check(against: expected, path: "FlowBlock2.mlpackage", function: "step_16") }

        var openOutputs = expected
        openOutputs.outputs = ["scale_logit": [], "shift": []]
        try openOutputs.check(against: expected, path: "FlowBlock2.mlpackage", function: "step_16")
    }

    @Test func textEncoderBatchIsAWildcard() throws {
        let manifest = try ExportManifest.decode(JSONSerialization.data(withJSONObject: Self.textManifest()), source: "manifest.json")
        let expected = try #require(manifest.textEncoderInterface())
        let declared = ModelInterface(inputs: ["input_ids": [2, 16], "attention_mask": [2, 16]], outputs: ["text_states": [2, 16, 32]])
        try declared.check(against: expected, path: "TextEncoder.mlpackage", function: "main")
        let tooShort = ModelInterface(inputs: ["input_ids": [1, 8], "attention_mask": [1, 8]], outputs: ["text_states": [1, 8, 32]])
        #expect(throws: StarFlowError.self) { try tooShort.check(against: expected, path: "TextEncoder.mlpackage", function: "main") }
    }

    static func withBlock(_ manifest: [String: Any], _ index: Int, _ change: (inout [String: Any]) -> Void) -> [String: Any] {
        var manifest = manifest
        var flow = manifest["flow"] as! [String: Any]
        var blocks = flow["blocks"] as! [[String: Any]]
        change(&blocks[index])
        flow["blocks"] = blocks
        manifest["flow"] = flow
        return manifest
    }

    @Test func blockSplitIntoPackagesChainsThroughTheHiddenState() throws {
        let split = Self.withBlock(Self.textManifest(), 2) { block in
            block["packages"] = ["FlowBlock2_0.mlpackage", "FlowBlock2_1.mlpackage"]
        }
        #expect(Self.loadError(split).contains("hidden state"))
        let named = Self.withBlock(split, 2) { $0["hidden"] = ["input": "hidden", "output": "next_hidden"] }
        let manifest = try Self.load(named)
        #expect(manifest.requiredFiles.contains("FlowBlock2_1.mlpackage"))
        let deep = manifest.flow.blocks[2]
        #expect(manifest.stepInterface(of: deep, chunk: 16, part: 0)
            == ModelInterface(inputs: ["tokens": [2, 16, 4], "position": [1]], outputs: ["next_hidden": [2, 16, nil]]))
        #expect(manifest.stepInterface(of: deep, chunk: 16, part: 1)
            == ModelInterface(inputs: ["hidden": [2, 16, nil], "position": [1]], outputs: ["scale_logit": [2, 16, 4], "shift": [2, 16, 4]]))
        #expect(manifest.prefillInterface(of: deep, part: 1) == ModelInterface(inputs: ["hidden": [2, 16, nil]], outputs: [:]))
        #expect(Self.loadError(named, skipping: ["FlowBlock2_1.mlpackage"]).contains("FlowBlock2_1.mlpackage"))
    }

    @Test func inputOutputCachesAndBatchesAreRefusedWithTheExportFlag() {
        var io = Self.textManifest()
        io["kv_cache"] = "io"
        #expect(Self.loadError(io).contains("kv_cache is io"))
        var batched = Self.textManifest()
        batched["batch"] = 2
        #expect(Self.loadError(batched).contains("--batch-size 1"))
    }

    @Test func unconditionalModelHasNoConditionRows() throws {
        var manifest = Self.withBlock(Self.textManifest(), 2) { block in
            block["has_text"] = false
            block["rows"] = 1
            block["text_length"] = 0
            block["cache_length"] = 64 + 15
            block["functions"] = ["step": ["1": "step_1", "16": "step_16"]]
        }
        manifest["condition"] = NSNull()
        manifest["text_encoder"] = NSNull()
        manifest["score_step"] = NSNull()
        #expect(try Self.load(manifest).condition == nil)
    }
}

import Foundation
import Testing
@testable import StarFlow

/// The step inputs of a `--step-tables` export, as the exporter's runner computes them
/// (`convert/coreml/step_tables.py`): table rows at the chunk's positions and a causal mask.
struct StepTablesTests {
    @Test func rowsAndMaskOfAChunk() throws {
        let rows = 6, dim = 2
        let tables = try StepTables(cos: (0..<12).map(Float.init), sin: (0..<12).map { -Float($0) }, rows: rows, headDim: dim)
        let (cos, sin, mask) = try tables.inputs(position: 2, count: 3)
        #expect(cos.shape == [3, 2] && cos.values == [4, 5, 6, 7, 8, 9])
        #expect(sin.values == [-4, -5, -6, -7, -8, -9])
        let b = StepTables.blocked
        #expect(mask.shape == [3, 6])
        #expect(mask.values == [0, 0, 0, b, b, b,
                                0, 0, 0, 0, b, b,
                                0, 0, 0, 0, 0, b])
        #expect(throws: StarFlowError.self) { try tables.inputs(position: 5, count: 2) }
    }

    @Test func tableFileIsReadAsTheExporterWritesIt() throws {
        var manifest = ExportManifestTests.withBlock(ExportManifestTests.textManifest(), 0) { block in
            block["step_tables"] = ["file": "FlowBlock0.rope.f32", "head_dim": 2,
                                    "inputs": ["rope_cos": "rope_cos", "rope_sin": "rope_sin", "mask": "mask"]] as [String: Any]
        }
        manifest["score_step"] = NSNull()
        let folder = try ExportManifestTests.exportFolder(manifest, skipping: ["FlowBlock0.rope.f32"])
        defer { try? FileManager.default.removeItem(at: folder) }
        let length = 79
        let values = (0..<(2 * length * 2)).map { Float($0) / 4 }
        let data = values.withUnsafeBufferPointer { Data(buffer: $0) }
        try data.write(to: folder.appendingPathComponent("FlowBlock0.rope.f32"))
        let loaded = try ExportManifest.load(from: folder)
        let block = loaded.flow.blocks[0]
        #expect(loaded.stepInterface(of: block, chunk: 16).inputs["mask"] == [16, 79])
        let tables = try StepTables(block: block, folder: folder)
        #expect(tables.cos == Array(values[..<(length * 2)]) && tables.sin == Array(values[(length * 2)...]))
    }
}

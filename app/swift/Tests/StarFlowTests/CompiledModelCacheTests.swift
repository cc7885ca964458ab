import Foundation
import Testing
@testable import StarFlow

/// The compile-once cache, with a fake compiler that writes a folder as Core ML's would: keyed
/// by package content and OS build, reused, compiled models passed through, temporary output
/// and other OS builds' entries cleaned up, and export folders holding `.mlmodelc` accepted.
struct CompiledModelCacheTests {
    final class FakeCompiler: @unchecked Sendable {
        private let lock = NSLock()
        private var compiled: [URL] = []
        private(set) var outputs: [URL] = []
        var calls: [URL] { lock.withLock { compiled } }

        func compile(_ package: URL) throws -> URL {
            let output = FileManager.default.temporaryDirectory.appendingPathComponent("fake-compile-\(UUID().uuidString).mlmodelc")
            try FileManager.default.createDirectory(at: output, withIntermediateDirectories: true)
            try Data("compiled".utf8).write(to: output.appendingPathComponent("model.mil"))
            lock.withLock {
                compiled.append(package)
                outputs.append(output)
            }
            return output
        }
    }

    static func scratch() throws -> URL {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("starflow-cache-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        return folder
    }

    static func package(in folder: URL, name: String = "FlowBlock0", weights: String = "w1") throws -> URL {
        let package = folder.appendingPathComponent("\(name).mlpackage")
        let data = package.appendingPathComponent("Data/com.apple.CoreML")
        try FileManager.default.createDirectory(at: data, withIntermediateDirectories: true)
        try Data("spec".utf8).write(to: data.appendingPathComponent("model.mlmodel"))
        try Data(weights.utf8).write(to: data.appendingPathComponent("weight.bin"))
        return package
    }

    @Test func compilesOncePerContentAndReuses() async throws {
        let folder = try Self.scratch()
        defer { try? FileManager.default.removeItem(at: folder) }
        let cache = CompiledModelCache(root: folder.appendingPathComponent("cache"), osBuild: "24A335")
        let package = try Self.package(in: folder)
        let compiler = FakeCompiler()
        let first = try await cache.compiledModel(at: package) { try compiler.compile($0) }
        let second = try await cache.compiledModel(at: package) { try compiler.compile($0) }
        #expect(first.path == second.path && compiler.calls == [package])
        #expect(first.lastPathComponent == "FlowBlock0.mlmodelc" && FileManager.default.fileExists(atPath: first.appendingPathComponent("model.mil").path))
        #expect(compiler.outputs.allSatisfy { !FileManager.default.fileExists(atPath: $0.path) }, "the compiler's temporary output is removed")
        try Data("w2".utf8).write(to: package.appendingPathComponent("Data/com.apple.CoreML/weight.bin"))
        let changed = try await cache.compiledModel(at: package) { try compiler.compile($0) }
        #expect(changed.path != first.path && compiler.calls.count == 2)
    }

    @Test func keyDependsOnContentAndOSBuildOnly() throws {
        let folder = try Self.scratch()
        defer { try? FileManager.default.removeItem(at: folder) }
        let a = try Self.package(in: folder.appendingPathComponent("a"))
        let b = try Self.package(in: folder.appendingPathComponent("b"))
        let c = try Self.package(in: folder.appendingPathComponent("c"), weights: "w9")
        let cache = CompiledModelCache(root: folder, osBuild: "24A335")
        #expect(try cache.entry(for: a) == cache.entry(for: b))
        #expect(try cache.entry(for: a) != cache.entry(for: c))
        #expect(try CompiledModelCache(root: folder, osBuild: "24B83").entry(for: a) != cache.entry(for: a))
    }

    @Test func compiledModelsPassThroughUncompiled() async throws {
        let compiler = FakeCompiler()
        let bundled = URL(fileURLWithPath: "/App.app/FlowBlock0.mlmodelc")
        let cache = CompiledModelCache(root: URL(fileURLWithPath: "/nonexistent"), osBuild: "x")
        #expect(try await cache.compiledModel(at: bundled) { try compiler.compile($0) } == bundled)
        #expect(compiler.calls.isEmpty)
    }

    @Test func pruneRemovesOtherOSBuildsAndClearRemovesEverything() async throws {
        let folder = try Self.scratch()
        defer { try? FileManager.default.removeItem(at: folder) }
        let package = try Self.package(in: folder)
        let root = folder.appendingPathComponent("cache")
        let compiler = FakeCompiler()
        let old = try await CompiledModelCache(root: root, osBuild: "23A344").compiledModel(at: package) { try compiler.compile($0) }
        let cache = CompiledModelCache(root: root, osBuild: "24A335")
        let current = try await cache.compiledModel(at: package) { try compiler.compile($0) }
        let removed = try cache.prune()
        #expect(removed.map(\.lastPathComponent) == [old.deletingLastPathComponent().lastPathComponent])
        #expect(FileManager.default.fileExists(atPath: current.path) && !FileManager.default.fileExists(atPath: old.path))
        try cache.clear()
        #expect(!FileManager.default.fileExists(atPath: root.path))
    }

    @Test func exportFoldersMayHoldCompiledModels() throws {
        let folder = try Self.scratch()
        defer { try? FileManager.default.removeItem(at: folder) }
        try FileManager.default.createDirectory(at: folder.appendingPathComponent("FlowBlock0.mlmodelc"), withIntermediateDirectories: true)
        _ = try Self.package(in: folder, name: "FlowBlock1")
        #expect(ExportManifest.modelURL(named: "FlowBlock0.mlpackage", in: folder)?.lastPathComponent == "FlowBlock0.mlmodelc")
        #expect(ExportManifest.modelURL(named: "FlowBlock1.mlpackage", in: folder)?.lastPathComponent == "FlowBlock1.mlpackage")
        #expect(ExportManifest.modelURL(named: "FlowBlock2.mlpackage", in: folder) == nil)
    }
}

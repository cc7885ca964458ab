import Foundation

/// Where compiled Core ML models live between launches: `root/<OS build>-<content hash>/<name>.mlmodelc`.
///
/// Compiling a `.mlpackage` takes minutes and gigabytes for the 3B model, so it is done once per
/// package content and OS build (a new OS may compile differently) and reused after. A compiled
/// `.mlmodelc` (what Xcode puts in an app bundle) is used as it is. The cache cleans what it
/// creates: the compiler's temporary output is moved in or removed, an interrupted entry never
/// counts as compiled, and `prune()` drops the entries of other OS builds.
public struct CompiledModelCache: Sendable {
    /// Compiles a `.mlpackage` and returns the temporary `.mlmodelc` it wrote (Core ML's `MLModel.compileModel(at:)`).
    public typealias Compiler = @Sendable (URL) async throws -> URL

    public let root: URL
    public let osBuild: String

    public init(root: URL, osBuild: String) {
        self.root = root
        self.osBuild = osBuild
    }

    /// The default place: Caches/StarFlow/CompiledModels, keyed by this system's OS build.
    public static func standard() throws -> CompiledModelCache {
        let caches = try FileManager.default.url(for: .cachesDirectory, in: .userDomainMask, appropriateFor: nil, create: true)
        return CompiledModelCache(root: caches.appendingPathComponent("StarFlow/CompiledModels"), osBuild: Self.currentOSBuild())
    }

    /// The running system's build, e.g. "24A335"; the version string where no build is reported.
    public static func currentOSBuild() -> String {
        let version = ProcessInfo.processInfo.operatingSystemVersionString
        if let open = version.range(of: "(Build "), let close = version[open.upperBound...].firstIndex(of: ")") {
            return String(version[open.upperBound..<close])
        }
        return version.filter { $0.isLetter || $0.isNumber || $0 == "." }
    }

    /// The cache folder for `package`: OS build and content hash.
    public func entry(for package: URL) throws -> URL {
        let key = "\(osBuild.isEmpty ? "unknown" : osBuild)-\(try ContentHash.of(package))"
        return root.appendingPathComponent(key)
    }

    /// A compiled model for `model`: itself if it is already `.mlmodelc`, else the cached
    /// compilation of the package, compiling it (once) with `compile` when missing.
    public func compiledModel(at model: URL, compile: Compiler) async throws -> URL {
        if model.pathExtension == "mlmodelc" { return model }
        let entry = try entry(for: model)
        let target = entry.appendingPathComponent(model.deletingPathExtension().lastPathComponent + ".mlmodelc")
        let manager = FileManager.default
        if manager.fileExists(atPath: target.path) { return target }
        let compiled = try await compile(model)
        defer { try? manager.removeItem(at: compiled) }
        try? manager.removeItem(at: entry)
        let staging = root.appendingPathComponent(".staging-\(UUID().uuidString)")
        defer { try? manager.removeItem(at: staging) }
        try manager.createDirectory(at: staging, withIntermediateDirectories: true)
        try manager.copyItem(at: compiled, to: staging.appendingPathComponent(target.lastPathComponent))
        try manager.moveItem(at: staging, to: entry)
        return target
    }

    /// Removes the entries of other OS builds and leftovers of interrupted compilations; returns what it removed.
    @discardableResult
    public func prune() throws -> [URL] {
        let manager = FileManager.default
        guard manager.fileExists(atPath: root.path) else { return [] }
        let prefix = "\(osBuild.isEmpty ? "unknown" : osBuild)-"
        let stale = try manager.contentsOfDirectory(at: root, includingPropertiesForKeys: nil)
            .filter { !$0.lastPathComponent.hasPrefix(prefix) }
        for url in stale { try manager.removeItem(at: url) }
        return stale
    }

    /// Removes everything the cache created.
    public func clear() throws {
        if FileManager.default.fileExists(atPath: root.path) { try FileManager.default.removeItem(at: root) }
    }
}

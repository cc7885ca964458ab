import Foundation

/// A 64-bit FNV-1a hash of a file or of a folder's files (relative paths and bytes, in sorted
/// order), for keying caches by content: any changed byte, added, removed or renamed file gives
/// another key. Not cryptographic; it guards against stale caches, not against tampering.
public enum ContentHash {
    private static let offset: UInt64 = 0xcbf2_9ce4_8422_2325
    private static let prime: UInt64 = 0x0000_0100_0000_01b3

    /// The hex digest of everything at `url`.
    public static func of(_ url: URL) throws -> String {
        var hash = offset
        let manager = FileManager.default
        var isDirectory: ObjCBool = false
        guard manager.fileExists(atPath: url.path, isDirectory: &isDirectory) else {
            throw StarFlowError.fileNotFound(path: url.path, fix: "point at an existing model package")
        }
        let files: [(String, URL)]
        if isDirectory.boolValue {
            let base = url.standardizedFileURL.path
            let enumerator = manager.enumerator(at: url, includingPropertiesForKeys: [.isRegularFileKey])
            var found: [(String, URL)] = []
            while let item = enumerator?.nextObject() as? URL {
                guard (try? item.resourceValues(forKeys: [.isRegularFileKey]))?.isRegularFile == true else { continue }
                found.append((String(item.standardizedFileURL.path.dropFirst(base.count)), item))
            }
            files = found.sorted { $0.0 < $1.0 }
        } else {
            files = [("", url)]
        }
        for (relative, file) in files {
            mix(Data(relative.utf8), into: &hash)
            mix(Data([0]), into: &hash)
            try mixFile(file, into: &hash)
        }
        return String(format: "%016llx", hash)
    }

    private static func mixFile(_ url: URL, into hash: inout UInt64) throws {
        let handle = try FileHandle(forReadingFrom: url)
        defer { try? handle.close() }
        while let chunk = try handle.read(upToCount: 1 << 22), !chunk.isEmpty {
            mix(chunk, into: &hash)
        }
    }

    private static func mix(_ data: Data, into hash: inout UInt64) {
        data.withUnsafeBytes { bytes in
            for byte in bytes {
                hash ^= UInt64(byte)
                hash = hash &* prime
            }
        }
    }
}

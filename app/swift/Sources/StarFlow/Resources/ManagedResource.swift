import Foundation

/// Something that holds memory only while it is loaded: load before use (or on first use),
/// unload to give the memory back, prewarm to do the slow first load (and the system's own
/// caching) ahead of time without keeping the memory.
public protocol ResourceManaging: AnyObject {
    func loadResources() throws
    func unloadResources()
    func prewarmResources() throws
}

extension ResourceManaging {
    public func prewarmResources() throws {
        try loadResources()
        unloadResources()
    }
}

/// One lazily loaded value (a Core ML model, a set of them): loaded by `load` on first use,
/// dropped by `unloadResources`, lent only inside `perform` so no caller keeps it past an unload.
/// Access is serialised, so one instance can be shared between tasks.
public final class ManagedResource<Value>: ResourceManaging, @unchecked Sendable {
    private let load: () throws -> Value
    private let lock = NSRecursiveLock()
    private var value: Value?
    private var onEvent: ((String) -> Void)?
    private let name: String

    /// `onEvent` hears "load NAME" and "unload NAME" (the reduce-memory tests read the order).
    public init(name: String, onEvent: ((String) -> Void)? = nil, load: @escaping () throws -> Value) {
        self.name = name
        self.onEvent = onEvent
        self.load = load
    }

    public var isLoaded: Bool { lock.withLock { value != nil } }

    public func loadResources() throws {
        try lock.withLock {
            guard value == nil else { return }
            value = try load()
            onEvent?("load \(name)")
        }
    }

    public func unloadResources() {
        lock.withLock {
            guard value != nil else { return }
            value = nil
            onEvent?("unload \(name)")
        }
    }

    /// Runs `body` with the value, loading it first if needed.
    public func perform<T>(_ body: (Value) throws -> T) throws -> T {
        try lock.withLock {
            try loadResources()
            guard let value else { throw StarFlowError.invalidArgument("\(name) could not be loaded") }
            return try body(value)
        }
    }
}

;; flat-fee: a metered SaaS backend written by hand in the WebAssembly text
;; format, with no toolchain but the host's own: every sandbox costs the same
;; flat fee (0.005 credits), whatever size it is and however long it lives,
;; like providers that price per job.
;;
;; It shows the contract at the level of the canonical ABI: the core module
;; below lays out every answer in linear memory by hand, and the component
;; around it lifts those functions to the typed `backend` interface.
;; `cargo xtask build-extensions --examples` turns it into flat-fee.wasm.
(component
  (core module $core
    (memory (export "memory") 1)
    ;; Bump allocator for what the host lowers into this memory.
    (global $heap (mut i32) (i32.const 8192))
    (func (export "realloc") (param $old i32) (param $old_size i32) (param $align i32) (param $size i32) (result i32)
      (local $ptr i32)
      (local.set $ptr
        (i32.and
          (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
          (i32.sub (i32.const 0) (local.get $align))))
      (global.set $heap (i32.add (local.get $ptr) (local.get $size)))
      (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
        (then
          (if (i32.eq
                (memory.grow
                  (i32.add
                    (i32.div_u (i32.sub (global.get $heap) (i32.mul (memory.size) (i32.const 65536))) (i32.const 65536))
                    (i32.const 1)))
                (i32.const -1))
            (then unreachable))))
      (local.get $ptr))

    (data (i32.const 1024) "flat-fee")
    (data (i32.const 1040) "0.1.0")
    (data (i32.const 1056) "WAT: a flat fee per sandbox, whatever it runs")

    ;; The fee, in micro-credits: 0.005 credits.
    (global $fee i64 (i64.const 5000))

    ;; info -> extension-info { id, version, kind, description } at 2048:
    ;; id @0/@4, version @8/@12, kind @16 (u8), description @20/@24.
    (func (export "info") (result i32)
      (i32.store (i32.const 2048) (i32.const 1024))
      (i32.store (i32.const 2052) (i32.const 8))
      (i32.store (i32.const 2056) (i32.const 1040))
      (i32.store (i32.const 2060) (i32.const 5))
      (i32.store8 (i32.const 2064) (i32.const 1)) ;; saas
      (i32.store (i32.const 2068) (i32.const 1056))
      (i32.store (i32.const 2072) (i32.const 45))
      (i32.const 2048))

    ;; A sandbox spec arrives flat: sandbox-id, profile, template (pointer,
    ;; length each), cpu-millis, memory-mb, ttl-secs, command, env (pointer,
    ;; length each), network.

    ;; estimate-cost -> result<cost-estimate, ext-error> at 4096:
    ;; discriminant @0, amount @8, rate-per-hour @16.
    (func (export "estimate-cost")
      (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
      (i32.store8 (i32.const 4096) (i32.const 0))
      (i64.store (i32.const 4104) (global.get $fee))
      (i64.store (i32.const 4112) (global.get $fee))
      (i32.const 4096))

    ;; create -> result<sandbox-handle, ext-error> at 4160: discriminant @0,
    ;; backend-ref @4/@8 (the sandbox id itself: unique, and the same again
    ;; for the same id), endpoint option @12 (none).
    (func (export "create")
      (param $id i32) (param $id_len i32)
      (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
      (i32.store8 (i32.const 4160) (i32.const 0))
      (i32.store (i32.const 4164) (local.get $id))
      (i32.store (i32.const 4168) (local.get $id_len))
      (i32.store8 (i32.const 4172) (i32.const 0))
      (i32.const 4160))

    ;; destroy(spec, handle) has more than 16 flat parameters: they arrive
    ;; in memory, behind one pointer. -> result<usage, ext-error> at 4224:
    ;; discriminant @0, four u64 @8..@32. A flat fee needs no usage.
    (func (export "destroy") (param i32) (result i32)
      (i32.store8 (i32.const 4224) (i32.const 0))
      (i64.store (i32.const 4232) (i64.const 0))
      (i64.store (i32.const 4240) (i64.const 0))
      (i64.store (i32.const 4248) (i64.const 0))
      (i64.store (i32.const 4256) (i64.const 0))
      (i32.const 4224))

    ;; meter-actual(spec, usage): also behind one pointer.
    ;; -> result<micro-credits, ext-error> at 4288: discriminant @0, amount @8.
    (func (export "meter-actual") (param i32) (result i32)
      (i32.store8 (i32.const 4288) (i32.const 0))
      (i64.store (i32.const 4296) (global.get $fee))
      (i32.const 4288))
  )
  (core instance $i (instantiate $core))

  (type $backend-kind (enum "self-hosted" "saas"))
  (type $extension-info (record
    (field "id" string) (field "version" string) (field "kind" $backend-kind) (field "description" string)))
  (type $sandbox-spec (record
    (field "sandbox-id" string) (field "profile" string) (field "template" string)
    (field "cpu-millis" u32) (field "memory-mb" u32) (field "ttl-secs" u32)
    (field "command" (list string)) (field "env" (list (tuple string string))) (field "network" bool)))
  (type $cost-estimate (record (field "amount" u64) (field "rate-per-hour" u64)))
  (type $sandbox-handle (record (field "backend-ref" string) (field "endpoint" (option string))))
  (type $usage (record
    (field "wall-ms" u64) (field "cpu-ms" u64) (field "memory-mb-ms" u64) (field "egress-bytes" u64)))
  (type $ext-error (variant
    (case "invalid-spec" string) (case "capacity" string) (case "unavailable" string)
    (case "not-found" string) (case "internal" string)))

  (func $info (result $extension-info)
    (canon lift (core func $i "info") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
  (func $estimate-cost (param "spec" $sandbox-spec) (result (result $cost-estimate (error $ext-error)))
    (canon lift (core func $i "estimate-cost") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
  (func $create (param "spec" $sandbox-spec) (result (result $sandbox-handle (error $ext-error)))
    (canon lift (core func $i "create") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
  (func $destroy (param "spec" $sandbox-spec) (param "handle" $sandbox-handle) (result (result $usage (error $ext-error)))
    (canon lift (core func $i "destroy") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
  (func $meter-actual (param "spec" $sandbox-spec) (param "usage" $usage) (result (result u64 (error $ext-error)))
    (canon lift (core func $i "meter-actual") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))

  ;; An exported interface must name every type its functions use. As
  ;; wit-component lays it out, the functions go through a small component
  ;; that imports the types and functions, then exports the types and the
  ;; functions typed with the exported types.
  (component $backend-interface
    (type $d-backend-kind (enum "self-hosted" "saas"))
    (import "import-type-backend-kind" (type $i-backend-kind (eq $d-backend-kind)))
    (type $d-extension-info (record
      (field "id" string) (field "version" string) (field "kind" $i-backend-kind) (field "description" string)))
    (import "import-type-extension-info" (type $i-extension-info (eq $d-extension-info)))
    (type $d-sandbox-spec (record
      (field "sandbox-id" string) (field "profile" string) (field "template" string)
      (field "cpu-millis" u32) (field "memory-mb" u32) (field "ttl-secs" u32)
      (field "command" (list string)) (field "env" (list (tuple string string))) (field "network" bool)))
    (import "import-type-sandbox-spec" (type $i-sandbox-spec (eq $d-sandbox-spec)))
    (type $d-cost-estimate (record (field "amount" u64) (field "rate-per-hour" u64)))
    (import "import-type-cost-estimate" (type $i-cost-estimate (eq $d-cost-estimate)))
    (type $d-sandbox-handle (record (field "backend-ref" string) (field "endpoint" (option string))))
    (import "import-type-sandbox-handle" (type $i-sandbox-handle (eq $d-sandbox-handle)))
    (type $d-usage (record
      (field "wall-ms" u64) (field "cpu-ms" u64) (field "memory-mb-ms" u64) (field "egress-bytes" u64)))
    (import "import-type-usage" (type $i-usage (eq $d-usage)))
    (type $d-ext-error (variant
      (case "invalid-spec" string) (case "capacity" string) (case "unavailable" string)
      (case "not-found" string) (case "internal" string)))
    (import "import-type-ext-error" (type $i-ext-error (eq $d-ext-error)))
    (import "import-func-info" (func $f-info (result $i-extension-info)))
    (import "import-func-estimate-cost" (func $f-estimate-cost (param "spec" $i-sandbox-spec) (result (result $i-cost-estimate (error $i-ext-error)))))
    (import "import-func-create" (func $f-create (param "spec" $i-sandbox-spec) (result (result $i-sandbox-handle (error $i-ext-error)))))
    (import "import-func-destroy" (func $f-destroy (param "spec" $i-sandbox-spec) (param "handle" $i-sandbox-handle) (result (result $i-usage (error $i-ext-error)))))
    (import "import-func-meter-actual" (func $f-meter-actual (param "spec" $i-sandbox-spec) (param "usage" $i-usage) (result (result u64 (error $i-ext-error)))))
    (type $x-backend-kind (enum "self-hosted" "saas"))
    (export $e-backend-kind "backend-kind" (type $x-backend-kind))
    (type $x-extension-info (record
      (field "id" string) (field "version" string) (field "kind" $e-backend-kind) (field "description" string)))
    (export $e-extension-info "extension-info" (type $x-extension-info))
    (type $x-sandbox-spec (record
      (field "sandbox-id" string) (field "profile" string) (field "template" string)
      (field "cpu-millis" u32) (field "memory-mb" u32) (field "ttl-secs" u32)
      (field "command" (list string)) (field "env" (list (tuple string string))) (field "network" bool)))
    (export $e-sandbox-spec "sandbox-spec" (type $x-sandbox-spec))
    (type $x-cost-estimate (record (field "amount" u64) (field "rate-per-hour" u64)))
    (export $e-cost-estimate "cost-estimate" (type $x-cost-estimate))
    (type $x-sandbox-handle (record (field "backend-ref" string) (field "endpoint" (option string))))
    (export $e-sandbox-handle "sandbox-handle" (type $x-sandbox-handle))
    (type $x-usage (record
      (field "wall-ms" u64) (field "cpu-ms" u64) (field "memory-mb-ms" u64) (field "egress-bytes" u64)))
    (export $e-usage "usage" (type $x-usage))
    (type $x-ext-error (variant
      (case "invalid-spec" string) (case "capacity" string) (case "unavailable" string)
      (case "not-found" string) (case "internal" string)))
    (export $e-ext-error "ext-error" (type $x-ext-error))
    (export "info" (func $f-info) (func (result $e-extension-info)))
    (export "estimate-cost" (func $f-estimate-cost) (func (param "spec" $e-sandbox-spec) (result (result $e-cost-estimate (error $e-ext-error)))))
    (export "create" (func $f-create) (func (param "spec" $e-sandbox-spec) (result (result $e-sandbox-handle (error $e-ext-error)))))
    (export "destroy" (func $f-destroy) (func (param "spec" $e-sandbox-spec) (param "handle" $e-sandbox-handle) (result (result $e-usage (error $e-ext-error)))))
    (export "meter-actual" (func $f-meter-actual) (func (param "spec" $e-sandbox-spec) (param "usage" $e-usage) (result (result u64 (error $e-ext-error)))))
  )
  (instance $backend (instantiate $backend-interface
    (with "import-type-backend-kind" (type $backend-kind))
    (with "import-type-extension-info" (type $extension-info))
    (with "import-type-sandbox-spec" (type $sandbox-spec))
    (with "import-type-cost-estimate" (type $cost-estimate))
    (with "import-type-sandbox-handle" (type $sandbox-handle))
    (with "import-type-usage" (type $usage))
    (with "import-type-ext-error" (type $ext-error))
    (with "import-func-info" (func $info))
    (with "import-func-estimate-cost" (func $estimate-cost))
    (with "import-func-create" (func $create))
    (with "import-func-destroy" (func $destroy))
    (with "import-func-meter-actual" (func $meter-actual))))
  (export "sandboxer:extension/backend@0.1.0" (instance $backend))
)
